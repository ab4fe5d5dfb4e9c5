"""The persistent decode step (engine/triton_persistent.py) against the model with a KVCache, one token at a time.

Without CUDA the kernel runs in Triton's interpreter with one program (several would wait on each other forever:
the interpreter runs programs one after another), in a subprocess started with TRITON_INTERPRET=1. On CUDA it runs
with one program per SM, and also with one, and the two must agree.
"""

import dataclasses

import pytest
import torch

from conftest import kv_cache_to_pool, pool_keys, run_in_triton_interpreter, triton_test_mode

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
    from qwen3.engine.triton_persistent import Launch, StackedWeights, decode_step

    model = small_model(dtype)
    weights = StackedWeights.from_model(model)
    prompt, steps, max_length, block_size = 21, 5, 64, 4
    ids = torch.randint(0, model.config.vocab_size, (1, prompt + steps), device=DEVICE)
    ref_cache = qwen3.KVCache.for_model(model, 1, max_length)
    with torch.no_grad():
        model(ids[:, :prompt], cache=ref_cache, positions=torch.arange(prompt, device=DEVICE)[None])
        pool, table = kv_cache_to_pool(ref_cache.k[:, 0], ref_cache.v[:, 0], prompt, block_size, 40,
                                       torch.Generator().manual_seed(splits))  # fmt: skip
        programs = [1] if DEVICE == "cpu" else [1, torch.cuda.get_device_properties(0).multi_processor_count]
        # small tasks: several per phase even on this model, and attention tiles smaller than the context
        launch = Launch(rows_qkv=16, rows_o=8, rows_gate_up=16, rows_down=8, block_t=8, splits=splits, num_warps=4)
        for pos in range(prompt, prompt + steps):
            token = ids[:, pos : pos + 1]
            want = model.hidden_states(token, torch.tensor([[pos]], device=DEVICE), ref_cache)[0, 0]
            position = torch.tensor([pos], device=DEVICE)
            block, offset = table[pos // block_size].item(), pos % block_size
            slot = torch.tensor([block * block_size + offset], dtype=torch.int32, device=DEVICE)
            outs = []
            for n in programs:
                x = model.model.embed_tokens(token)[0, 0].contiguous()
                pool_before = pool.clone()
                decode_step(weights, x, position, slot, pool, table, model.rope.cos, model.rope.sin, n, launch)
                outs.append(model.model.norm(x))
                # the new key and value, at this position of every layer, and nothing else written
                k, v = pool_keys(pool, table, pos)
                assert rel_norm(k, ref_cache.k[:, 0, :, pos]) < tolerance(dtype)
                assert rel_norm(v, ref_cache.v[:, 0, :, pos]) < tolerance(dtype)
                written = (pool != pool_before).flatten(0, 1).any(-1).any(-1).nonzero().tolist()  # (layer, block, slot)
                assert {(b, s) for _, b, s in written} <= {(block, offset)}
                if n != programs[-1]:  # the next run writes the same slot again
                    pool.copy_(pool_before)
            for got in outs:
                assert rel_norm(got, want) < tolerance(dtype)
            if len(outs) > 1:  # the same tasks in the same order per row: the same numbers
                assert torch.equal(outs[0], outs[1])


def rel_norm(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def tolerance(dtype: torch.dtype) -> float:
    # fp32: the kernel's sums run in another order than the model's. bf16: both round every activation to 8 bits
    # (2**-8 relative), and the differences compound over the layers
    return 1e-4 if dtype == torch.float32 else 3e-2


@kernel_test
def test_bad_arguments_name_what_is_wrong():
    from qwen3.engine.triton_persistent import StackedWeights, decode_step

    model = small_model(torch.float32)
    weights = StackedWeights.from_model(model)
    pool = torch.zeros(2, 3, 4, 8, 2, 16, device=DEVICE)
    table = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    x = torch.zeros(48, device=DEVICE)
    position = slot = torch.tensor([0], device=DEVICE)
    cos, sin = model.rope.cos, model.rope.sin
    with pytest.raises(ValueError, match=r"kv must be a contiguous pool \(2, 3, blocks, block_size, nkv, 16\)"):
        decode_step(weights, x, position, slot, pool[0], table, cos, sin, 1)
    with pytest.raises(ValueError, match=r"x must be a contiguous \(48,\) tensor"):
        decode_step(weights, x[:40], position, slot, pool, table, cos, sin, 1)
    with pytest.raises(ValueError, match="block_table be a 1-d int32 tensor"):
        decode_step(weights, x, position, slot, pool, table.long(), cos, sin, 1)
    with pytest.raises(ValueError, match="num_programs must be at least 1"):
        decode_step(weights, x, position, slot, pool, table, cos, sin, 0)


def test_shared_stacks_leave_the_model_unchanged():
    """share=True: the layers' parameters become views of the stacks (one copy of the weights), same values."""
    from qwen3.engine.triton_persistent import StackedWeights

    model = small_model(torch.float32).cpu()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        before = model(ids)
        weights = StackedWeights.from_model(model, share=True)
        after = model(ids)
    assert torch.equal(before, after)
    layer = model.model.layers[1]
    assert layer.self_attn.qkv_proj.weight.data_ptr() == weights.qkv[1].data_ptr()
    assert layer.mlp.down_proj.weight.data_ptr() == weights.down[1].data_ptr()


@kernel_test
def test_the_engine_decodes_one_sequence_through_the_kernel():
    """LLM at batch 1: every decode step of a lone sequence through the kernel (the graph of bucket 1 on CUDA, an
    eager launch in the interpreter), greedy tokens equal to qwen3.generate's; two sequences at once take the paged
    kernels, then one alone the kernel again, through the prefix cache's shared blocks."""
    import qwen3
    from qwen3 import LLM, SamplingParams
    from qwen3.engine.attention import triton_ops
    from qwen3.engine.persistent import PersistentDecode

    model = small_model(torch.float32)
    llm = LLM(model, kv_cache_tokens=512, block_size=8, max_num_seqs=4, persistent_decode=DEVICE == "cuda" or None)
    if DEVICE == "cpu":  # the reference kernels on the CPU: put the Triton ones and the persistent step in
        llm.runner.kernels = triton_ops()
        llm.runner.persistent = PersistentDecode(model, llm.pool)
    else:
        assert 1 in llm.runner.graphs and llm.runner.persistent is not None
    launches = []  # eager launches (the interpreter) and bucket-1 graph replays (CUDA)
    step, replay = llm.runner.persistent.hidden_states, llm.runner._replay
    llm.runner.persistent.hidden_states = lambda *args: launches.append(1) or step(*args)
    llm.runner._replay = lambda bucket, *args: launches.append(bucket) or replay(bucket, *args)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (11, 30)]
    prompts.append(prompts[1][:20] + [7, 8, 9])  # shares two full blocks with the second: prefix-cache hits
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = [qwen3.generate(model, [p], 6)[0].tolist() for p in prompts]
    assert llm.generate(prompts[0], params, use_tqdm=False)[0].token_ids == want[0]
    assert launches == [1] * 5  # the first token comes from the prompt step
    assert [o.token_ids for o in llm.generate(prompts[1:], params, use_tqdm=False)] == want[1:]
    again = llm.generate(prompts[2], params, use_tqdm=False)[0]
    assert again.token_ids == want[2] and again.num_cached_tokens >= 16
    llm.block_manager.check_all_free()


def test_persistent_decode_argument_is_checked():
    from qwen3 import LLM

    with pytest.raises(ValueError, match="persistent_decode='yes' must be None"):
        LLM(small_model(torch.float32).cpu(), persistent_decode="yes")
    with pytest.raises(ValueError, match="persistent_decode=True, but it needs CUDA graphs"):
        LLM(small_model(torch.float32).cpu(), kv_cache_tokens=64, persistent_decode=True)
