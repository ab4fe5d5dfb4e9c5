"""The persistent decode step (kernels/persistent_decode.py) against the model with a KVCache, one token at a time.

Without CUDA the kernel runs in Triton's interpreter with one program (several would wait on each other forever:
the interpreter runs programs one after another), in a subprocess started with TRITON_INTERPRET=1. On CUDA it runs
with one program per SM, and also with one, and the two must agree.
"""

import dataclasses

import pytest
import torch

from conftest import run_in_triton_interpreter, triton_test_mode

triton = pytest.importorskip("triton")

_, DEVICE, RUN_KERNELS, kernel_test = triton_test_mode()


@pytest.mark.skipif(RUN_KERNELS, reason="the kernel runs in this process")
def test_persistent_decode_in_triton_interpreter():
    run_in_triton_interpreter(__file__, select="not in_triton_interpreter")


def small_model(dtype):
    import qwen3

    torch.manual_seed(0)
    config = dataclasses.replace(qwen3.Qwen3Config.from_preset("0.6B"), vocab_size=300, hidden_size=48,
                                 intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256)  # fmt: skip
    model = qwen3.Qwen3ForCausalLM(config)
    model.init_weights(std=0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    return model.to(DEVICE, dtype).eval()


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3, 16])  # 16: more splits than a split's 2 keys need, some left empty
def test_decode_steps_equal_the_model_with_a_kv_cache(dtype, splits):
    import qwen3
    from qwen3.kernels.persistent_decode import Launch, StackedWeights, decode_step

    model = small_model(dtype)
    weights = StackedWeights.from_model(model)
    prompt, steps, max_length = 21, 5, 64
    ids = torch.randint(0, model.config.vocab_size, (1, prompt + steps), device=DEVICE)
    ref_cache = qwen3.KVCache.for_model(model, 1, max_length)
    cache = qwen3.KVCache.for_model(model, 1, max_length)
    with torch.no_grad():
        model(ids[:, :prompt], cache=ref_cache, positions=torch.arange(prompt, device=DEVICE)[None])
        cache.k.copy_(ref_cache.k)
        cache.v.copy_(ref_cache.v)
        programs = [1] if DEVICE == "cpu" else [1, torch.cuda.get_device_properties(0).multi_processor_count]
        # small tasks: several per phase even on this model, and attention tiles smaller than the context
        launch = Launch(rows_qkv=16, rows_o=8, rows_gate_up=16, rows_down=8, block_t=8, splits=splits, num_warps=4)
        for pos in range(prompt, prompt + steps):
            token = ids[:, pos : pos + 1]
            want = model.hidden_states(token, torch.tensor([[pos]], device=DEVICE), ref_cache)[0, 0]
            outs = []
            for n in programs:
                x = model.model.embed_tokens(token)[0, 0].contiguous()
                k_before, v_before = cache.k.clone(), cache.v.clone()
                decode_step(weights, x, pos, cache.k[:, 0], cache.v[:, 0], model.rope.cos, model.rope.sin, n, launch)
                outs.append(model.model.norm(x))
                if n != programs[-1]:  # the next run writes the same slot again
                    cache.k.copy_(k_before)
                    cache.v.copy_(v_before)
            tolerance = 1e-4 if dtype == torch.float32 else 3e-2
            for got in outs:
                assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tolerance
            if len(outs) > 1:
                assert ((outs[0].float() - outs[1].float()).norm() / outs[0].float().norm()).item() < 1e-6 \
                    if dtype == torch.float32 else torch.equal(outs[0], outs[1])  # fmt: skip
            # the new key and value, at this position of every layer
            scale = ref_cache.k[:, 0, :, pos].float().norm()
            assert ((cache.k[:, 0, :, pos].float() - ref_cache.k[:, 0, :, pos].float()).norm() / scale) < tolerance
            assert torch.allclose(cache.v[:, 0, :, pos].float(), ref_cache.v[:, 0, :, pos].float(), rtol=tolerance,
                                  atol=tolerance)  # fmt: skip


@kernel_test
def test_bad_arguments_name_what_is_wrong():
    from qwen3.kernels.persistent_decode import StackedWeights, decode_step

    model = small_model(torch.float32)
    weights = StackedWeights.from_model(model)
    cache = torch.zeros(3, 2, 8, 16, device=DEVICE)
    x = torch.zeros(48, device=DEVICE)
    with pytest.raises(ValueError, match="position 8 is outside the cache"):
        decode_step(weights, x, 8, cache, cache.clone(), model.rope.cos, model.rope.sin, 1)
    with pytest.raises(ValueError, match=r"x must be a contiguous \(48,\) tensor"):
        decode_step(weights, x[:40], 0, cache, cache.clone(), model.rope.cos, model.rope.sin, 1)
    with pytest.raises(ValueError, match="num_programs must be at least 1"):
        decode_step(weights, x, 0, cache, cache.clone(), model.rope.cos, model.rope.sin, 0)
