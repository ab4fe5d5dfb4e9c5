"""Int8 weight-only quantization: the quantizer against its definition, both matmul paths against a float64
reference and against each other, whole-model error and KL, meta-device preparation, and checkpoints.

Tolerances of the matmul tests are worst-case rounding bounds, not fitted numbers. For y_j = sum_k x_k W_jk
computed with fp32 accumulation and rounded to the dtype with unit roundoff u (fp32 2^-24, fp16 2^-11,
bf16 2^-8), |y - y_exact| <= (r u + (K + 2) 2^-24) * sum_k |x_k| |W_jk| (Higham's gamma_n bound), where r
is the number of roundings to the dtype: 2 for the plain path (the matmul output, then the product with
the scale), 1 for the int8pack kernel. The reference takes the same (already rounded) x and the
*dequantized* weights q * s in float64, so only the kernels' own rounding is measured.

The round-trip tests (test_roundtrip_*) go through qwen3.save_model / qwen3.load_model, which must write
and read `quantization_config` (see quantize.py's module docstring).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import qwen3
from conftest import SMALL as CONFTEST_SMALL
from qwen3.checkpoint import fused_parts, unfuse_state
from qwen3.config import ConfigError
from qwen3.kernels import cpu_gemv
from qwen3.quantize import (
    INT8PACK_MAX_ROWS,
    MODULES_LINEAR,
    MODULES_WITH_EMBEDDING,
    QUANT_METHOD,
    Int8Embedding,
    Int8Linear,
    dequantize_per_row,
    kl_divergence,
    prepare_int8_modules,
    quantization_config,
    quantize_int8,
    quantize_per_row,
    retie_lm_head,
    tied_lm_head,
    weight_bytes,
)

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FP32_U = 2.0**-24

# conftest's small config: nh * D = 96 and hidden 64, so every in_features (64, 96) is a multiple of 16
# and the int8pack kernel can run; the tie is chosen per test.
SMALL = {k: v for k, v in CONFTEST_SMALL.items() if k != "tie_word_embeddings"}
LINEARS_PER_LAYER = 4  # qkv (fused), o, gate_up (fused), down


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_model(seed: int, tied: bool = True, std: float = 0.1) -> qwen3.Qwen3ForCausalLM:
    """A random small Qwen3. std 0.1 (not the training init's 0.02) gives logits of O(1), so that the
    next-token distributions are far from uniform and the KL test measures something."""
    torch.manual_seed(seed)
    model = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config(**SMALL, tie_word_embeddings=tied))
    model.init_weights(std=std)
    return model.eval()


def token_ids(seed: int, shape: tuple[int, int] = (2, 16)) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], shape, generator=generator(seed))


def random_int8_linear(in_features: int, out_features: int, dtype: torch.dtype, seed: int) -> Int8Linear:
    gen = generator(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) / in_features**0.5)
    return Int8Linear.from_float(linear.to(dtype))


def matmul_bound(x: torch.Tensor, module: Int8Linear, roundings: int) -> torch.Tensor:
    """The worst-case rounding error of x W^T in x's dtype, elementwise (see the module docstring)."""
    K = x.shape[-1]
    dequantized = dequantize_per_row(module.weight.double(), module.weight_scale.double())
    magnitude = x.double().abs() @ dequantized.abs().T
    return (roundings * UNIT_ROUNDOFF[x.dtype] + (K + 2) * FP32_U) * magnitude


def reference_matmul(x: torch.Tensor, module: Int8Linear) -> torch.Tensor:
    return x.double() @ (module.weight.double() * module.weight_scale.double()[:, None]).T


# ---------------------------------------------------------------------------------------------------
# The quantizer
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_row_definition_and_error_bound(dtype):
    gen = generator(0)
    magnitudes = torch.logspace(-2, 1, 33)[:, None]  # rows of very different sizes
    w = (torch.randn(33, 65, generator=gen) * magnitudes).to(dtype)
    w[5] = 0
    q, scale = quantize_per_row(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == dtype and scale.shape == (33,)

    amax = w.double().abs().amax(dim=1)
    nonzero = amax > 0
    exact_scale = amax[nonzero] / 127
    u = UNIT_ROUNDOFF[dtype]
    # The scale is amax / 127 rounded to the dtype (at most two roundings: fp32 division, then the dtype).
    assert ((scale.double()[nonzero] - exact_scale).abs() <= 2 * u * exact_scale).all()
    assert scale[5] == 1 and (q[5] == 0).all()
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[nonzero] == 127).all()

    # |W - q s| <= s / 2 for the stored s; the slack covers rounding w / s in fp32 (|w / s| <= 128).
    s = scale.double()[:, None]
    error = (w.double() - q.double() * s).abs()
    assert (error <= s / 2 + 128 * FP32_U * s).all()


def test_quantize_per_row_runs_on_meta():
    q, scale = quantize_per_row(torch.empty(7, 5, device="meta", dtype=torch.bfloat16))
    assert q.is_meta and q.dtype == torch.int8 and q.shape == (7, 5)
    assert scale.is_meta and scale.dtype == torch.bfloat16 and scale.shape == (7,)


def test_int8_linear_rejects_a_bias_and_unknown_kernels():
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.from_float(nn.Linear(4, 4, bias=True))
    with pytest.raises(ValueError, match="kernel"):
        Int8Linear(4, 4).kernel = "fast"


# ---------------------------------------------------------------------------------------------------
# The matmul: both paths against float64, and against each other
# ---------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 7), (96, 64), (33, 64), (65, 7)])
@pytest.mark.parametrize("kernel", ["plain", "int8pack"])
def test_int8_linear_matches_float64_reference(dtype, in_features, out_features, kernel):
    module = random_int8_linear(in_features, out_features, dtype, seed=in_features + out_features)
    module.kernel = kernel
    x = torch.randn(2, 3, in_features, generator=generator(1)).to(dtype)  # (B, T, in)
    if kernel == "int8pack" and in_features % 16:
        with pytest.raises(ValueError, match="multiple of 16"):
            module(x)
        return
    with torch.no_grad():
        y = module(x)
    assert y.dtype == dtype and y.shape == (2, 3, out_features)
    error = (y.double() - reference_matmul(x, module)).abs()
    assert (error <= matmul_bound(x, module, roundings=2 if kernel == "plain" else 1)).all()


SHAPES = [(1, 64, 64), (3, 96, 33), (5, 16, 7), (17, 128, 96), (4, 1024, 5), (40, 64, 13)]  # (rows, in, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "in_features", "out_features"), SHAPES)
def test_int8pack_agrees_with_plain(dtype, rows, in_features, out_features):
    """The two paths each stay within their rounding bound of the exact result, so they differ by at most
    the sum of the bounds: (3 u + 2 (K + 2) 2^-24) sum_k |x_k| |W_jk|. In bf16 that is about 1.5 ulp of the
    largest output; measured differences are within 1 ulp of each output."""
    module = random_int8_linear(in_features, out_features, dtype, seed=rows)
    x = torch.randn(rows, in_features, generator=generator(2)).to(dtype)
    with torch.no_grad():
        plain, fast = module.forward_plain(x), module.forward_int8pack(x)
    bound = matmul_bound(x, module, roundings=2) + matmul_bound(x, module, roundings=1)
    assert ((plain.double() - fast.double()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [7, 65])
def test_odd_in_features_take_the_plain_path(dtype, in_features, monkeypatch):
    """The bf16 kernel has no remainder loop (garbage at K=65, a segfault at K=7): never called there."""
    monkeypatch.setattr(cpu_gemv, "available", lambda: False)  # PyTorch's kernels (tests/test_kernels.py: qwen3's)
    module = random_int8_linear(in_features, 33, dtype, seed=3)
    x = torch.randn(1, in_features, generator=generator(3)).to(dtype)
    assert torch.equal(module(x), module.forward_plain(x))
    with pytest.raises(ValueError, match="multiple of 16"):
        module.forward_int8pack(x)


def test_auto_kernel_choice(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "available", lambda: False)  # PyTorch's kernels (tests/test_kernels.py: qwen3's)
    module = random_int8_linear(64, 48, torch.bfloat16, seed=4)
    few = torch.randn(2, 1, 64, generator=generator(4)).bfloat16()  # decode: int8pack
    many = torch.randn(1, INT8PACK_MAX_ROWS + 1, 64, generator=generator(5)).bfloat16()  # prefill: plain
    with torch.no_grad():
        assert torch.equal(module(few), module.forward_int8pack(few))
        assert torch.equal(module(many), module.forward_plain(many))
        module.kernel = "plain"
        assert torch.equal(module(few), module.forward_plain(few))
    # fp32: the fp32 kernel is a scalar loop, so auto runs the bf16 one on x rounded to bf16 for few rows
    module32 = random_int8_linear(64, 48, torch.float32, seed=4)
    x32 = torch.randn(2, 1, 64, generator=generator(9))
    with torch.no_grad():
        y = module32(x32)
        assert y.dtype == torch.float32
        assert torch.equal(y, module32.forward_int8pack(x32.bfloat16()).float())
        bound = matmul_bound(x32.bfloat16(), module32, roundings=3)  # x, the scales and the output, in bf16
        assert ((y.double() - reference_matmul(x32, module32)).abs() <= bound).all()
        many32 = torch.randn(1, INT8PACK_MAX_ROWS + 1, 64, generator=generator(10))
        assert torch.equal(module32(many32), module32.forward_plain(many32))


def test_auto_takes_plain_when_gradients_flow():
    """The kernel has no backward; d sum(y) / dx = sum_j q_j s_j, within bf16 rounding of the float64 sum."""
    module = random_int8_linear(64, 8, torch.bfloat16, seed=6)
    x = torch.randn(1, 64, generator=generator(6)).bfloat16().requires_grad_()
    module(x).float().sum().backward()
    rows = module.weight.double() * module.weight_scale.double()[:, None]  # (out, in)
    bound = (2 * UNIT_ROUNDOFF[torch.bfloat16] + 10 * FP32_U) * rows.abs().sum(0)
    assert ((x.grad[0].double() - rows.sum(0)).abs() <= bound).all()


def test_int8pack_copies_a_misaligned_input():
    """The bf16 kernel loads x with aligned 32-byte loads; a view 16 bytes into a buffer must not reach it."""
    module = random_int8_linear(64, 24, torch.bfloat16, seed=7)
    buffer = torch.randn(3 * 64 + 8, generator=generator(7)).bfloat16()
    x = buffer[8:].view(3, 64)
    assert x.data_ptr() % 32 == 16
    with torch.no_grad():
        assert torch.equal(module.forward_int8pack(x), module.forward_int8pack(x.clone()))


def test_compiled_auto_takes_the_plain_path():
    """Under torch.compile the eager-only kernel checks must not break the graph; inductor fuses the plain
    path (it may reorder the fp32 accumulation, so the plain path's bound applies, not equality)."""
    module = random_int8_linear(64, 48, torch.bfloat16, seed=8)
    x = torch.randn(1, 64, generator=generator(8)).bfloat16()
    with torch.no_grad():
        y = torch.compile(module, fullgraph=True)(x)
    assert ((y.double() - reference_matmul(x, module)).abs() <= matmul_bound(x, module, roundings=2)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_embedding_matches_float64_reference(dtype):
    embedding = nn.Embedding(50, 32)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(50, 32, generator=generator(8)))
    module = Int8Embedding.from_float(embedding.to(dtype))
    ids = torch.randint(0, 50, (3, 7), generator=generator(9))
    y = module(ids)
    reference = module.weight.double()[ids] * module.weight_scale.double()[ids, None]
    assert y.dtype == dtype and y.shape == (3, 7, 32)
    assert ((y.double() - reference).abs() <= UNIT_ROUNDOFF[dtype] * reference.abs()).all()  # one rounding


# ---------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def test_quantize_replaces_every_linear_and_unties_a_float_embedding():
    model = small_model(0)
    embedding = model.model.embed_tokens
    original = embedding.weight.detach().clone()
    config = model.config
    twin = qwen3.Qwen3ForCausalLM(config)  # shares the config object
    quantize_int8(model)

    modules = list(model.modules())
    assert not any(isinstance(m, nn.Linear) for m in modules)
    assert sum(isinstance(m, Int8Linear) for m in modules) == LINEARS_PER_LAYER * SMALL["num_hidden_layers"] + 1
    assert model.model.embed_tokens is embedding and torch.equal(embedding.weight, original)
    assert isinstance(model.lm_head, Int8Linear)
    assert not tied_lm_head(model)  # the LM head has its own int8 copy now
    assert model.config is config and config.tie_word_embeddings is True  # the config is left as built
    assert tied_lm_head(twin)
    assert quantization_config(model) == {
        "quant_method": QUANT_METHOD,
        "bits": 8,
        "group": "per_channel",
        "modules": MODULES_LINEAR,
    }
    assert not any(p.requires_grad for name, p in model.named_parameters() if "proj" in name or "lm_head" in name)


def test_quantize_with_embedding_keeps_a_tied_model_tied():
    model = quantize_int8(small_model(1), include_embedding=True)
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight_scale is model.model.embed_tokens.weight_scale
    assert tied_lm_head(model)
    assert quantization_config(model)["modules"] == MODULES_WITH_EMBEDDING
    model.to(torch.bfloat16)  # Parameters convert in place: still one tensor
    assert model.lm_head.weight_scale is model.model.embed_tokens.weight_scale
    assert model.lm_head.weight_scale.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.int8


def test_quantize_untied_with_embedding_keeps_them_apart():
    model = quantize_int8(small_model(2, tied=False), include_embedding=True)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not tied_lm_head(model)


def test_quantize_twice_is_refused():
    model = quantize_int8(small_model(3))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_int8(model)


def test_quantized_model_close_to_float_model():
    """Per matmul, the rigorous bound: with |W - q s| <= s/2, |y_j - y'_j| <= (s_j / 2) sum_k |x_k| (plus
    fp32 rounding), checked on the inputs each layer sees in the float model. End to end there is no
    rigorous bound (norms, softmax), so the logits are held to the statistical version of the same bound:
    each matmul adds a relative error eps = rms(W - q s) / rms(W) (about amax / (127 sqrt(12) rms(W)),
    0.6% here), and relative errors add up along the deepest chain of quantized matmuls, 13 here (v, o,
    gate/up, down in each of 3 layers, then the LM head): rms(logit error) / rms(logits) <= 13 eps
    (measured 3.7-4.2 eps). KL(P||Q) <= E[(max delta - min delta)^2] / 8 (Hoeffding's lemma, delta the
    logit change) holds exactly; and it is small in absolute terms (measured 2e-4 nats)."""
    float_model = small_model(4)
    model = quantize_int8(copy.deepcopy(float_model), include_embedding=True)
    ids = token_ids(4)

    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0]))
        for name, m in float_model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        reference = float_model(ids)
        for hook in hooks:
            hook.remove()
        logits = model(ids)
        quantized_modules = dict(model.named_modules())
        assert len(inputs) == LINEARS_PER_LAYER * SMALL["num_hidden_layers"] + 1
        for name, x in inputs.items():
            module, float_module = quantized_modules[name], float_model.get_submodule(name)
            x64 = x.double()
            delta = (module(x).double() - float_module(x).double()).abs()
            scale_term = x64.abs().sum(-1, keepdim=True) * module.weight_scale.double() / 2
            rounding = 2 * (x.shape[-1] + 2) * FP32_U * (x64.abs() @ float_module.weight.double().abs().T)
            assert (delta <= scale_term + rounding).all(), name

    eps = 0.0
    for name, module in quantized_modules.items():
        if isinstance(module, Int8Linear):
            w = float_model.get_submodule(name).weight.double()
            w_hat = dequantize_per_row(module.weight.double(), module.weight_scale.double())
            eps = max(eps, ((w - w_hat).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item())
    assert 0.003 < eps < 0.01
    rms = lambda t: t.double().pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(logits - reference) <= 13 * eps * rms(reference)

    delta = (logits - reference).double()
    kl = kl_divergence(reference, logits)
    hoeffding = ((delta.amax(-1) - delta.amin(-1)) ** 2 / 8).mean()
    assert 0 < kl <= hoeffding
    assert kl < 1e-3


def test_kl_divergence_matches_torch_distributions():
    p = torch.randn(2, 5, 40, generator=generator(10)) * 3
    q = p + torch.randn(2, 5, 40, generator=generator(11))
    Categorical = torch.distributions.Categorical
    kl = kl_divergence(p, q.bfloat16())
    assert kl.dtype == torch.float64 and kl.shape == ()
    q_rounded = q.bfloat16().double()
    reference = torch.distributions.kl_divergence(Categorical(logits=p.double()), Categorical(logits=q_rounded))
    assert torch.allclose(kl, reference.mean(), rtol=1e-12, atol=0)
    assert kl_divergence(p, p) == 0
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(p, q[..., :-1])


def test_weight_bytes_counts_int8_and_scales():
    float_model = small_model(5, tied=False)
    linears = [m for m in float_model.modules() if isinstance(m, nn.Linear)]
    float_bytes = 4 * float_model.num_parameters()
    assert weight_bytes(float_model) == float_bytes
    saved = sum(4 * m.weight.numel() - (m.weight.numel() + 4 * m.out_features) for m in linears)
    assert weight_bytes(quantize_int8(float_model)) == float_bytes - saved


# ---------------------------------------------------------------------------------------------------
# Building on the meta device for loading
# ---------------------------------------------------------------------------------------------------

CASES = [(True, False), (True, True), (False, False), (False, True)]  # (tied, include_embedding)


@pytest.mark.parametrize(("tied", "include_embedding"), CASES)
def test_prepare_on_meta_matches_quantized_model(tied, include_embedding):
    quantized = quantize_int8(small_model(6, tied=tied), include_embedding=include_embedding)
    saved = dataclasses.replace(quantized.config, tie_word_embeddings=tied_lm_head(quantized))  # as save_model
    with torch.device("meta"):
        meta = qwen3.Qwen3ForCausalLM(saved)  # the config a loader reads from config.json
    prepare_int8_modules(meta, quantization_config(quantized))

    assert module_types(meta) == module_types(quantized)
    state, meta_state = quantized.state_dict(), meta.state_dict()
    assert list(meta_state) == list(state)
    for name, tensor in meta_state.items():
        assert tensor.is_meta, name
        assert (tensor.shape, tensor.dtype) == (state[name].shape, state[name].dtype), name
    assert quantization_config(meta) == quantization_config(quantized)

    meta.load_state_dict(state, strict=True, assign=True)
    if tied_lm_head(quantized):
        retie_lm_head(meta)
        assert meta.lm_head.weight is meta.model.embed_tokens.weight
        assert meta.lm_head.weight_scale is meta.model.embed_tokens.weight_scale
    meta.init_buffers("cpu")
    ids = token_ids(6)
    with torch.no_grad():
        assert torch.equal(meta(ids), quantized(ids))


def test_prepare_rejects_a_bad_quantization_config():
    def meta_model(tied: bool) -> qwen3.Qwen3ForCausalLM:
        with torch.device("meta"):
            return qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config(**SMALL, tie_word_embeddings=tied))

    good = {"quant_method": QUANT_METHOD, "bits": 8, "group": "per_channel", "modules": MODULES_LINEAR}
    for field, value in [("quant_method", "gptq"), ("bits", 4), ("group", "per_tensor"), ("modules", "linear")]:
        with pytest.raises(ConfigError, match=f"quantization_config.{field}"):
            prepare_int8_modules(meta_model(False), {**good, field: value})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        prepare_int8_modules(meta_model(True), good)


# ---------------------------------------------------------------------------------------------------
# Through save_model / load_model (needs checkpoint.py to write and read quantization_config)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tied", "include_embedding"), CASES)
def test_roundtrip_int8_checkpoint(tmp_path, tied, include_embedding):
    quantized = quantize_int8(small_model(7, tied=tied), include_embedding=include_embedding)
    qwen3.save_model(quantized, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == quantization_config(quantized)
    assert config["tie_word_embeddings"] is tied_lm_head(quantized) is (tied and include_embedding)
    assert config["torch_dtype"] == "float32"  # the float dtype, not int8
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        stored = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert stored["model.layers.0.self_attn.q_proj.weight"] == "I8"
    assert stored["model.layers.0.self_attn.q_proj.weight_scale"] == "F32"
    assert stored["model.embed_tokens.weight"] == ("I8" if include_embedding else "F32")
    expected_keys = set(unfuse_state(quantized.state_dict(), fused_parts(quantized)))  # Hugging Face's names
    if tied_lm_head(quantized):  # the tied LM head is not stored, scales included
        expected_keys -= {"lm_head.weight", "lm_head.weight_scale"}
    assert set(stored) == expected_keys
    # per-row scales: the fused matrix's int8 rows and scales are those of each separate matrix, quantized alone
    separate = unfuse_state(small_model(7, tied=tied).state_dict(), fused_parts(small_model(7, tied=tied)))
    saved = load_file(tmp_path / "model.safetensors")
    for name in ("model.layers.1.self_attn.k_proj", "model.layers.2.mlp.up_proj"):
        q, scale = quantize_per_row(separate[name + ".weight"])
        assert torch.equal(saved[name + ".weight"], q) and torch.equal(saved[name + ".weight_scale"], scale)

    loaded = qwen3.load_model(tmp_path)
    assert module_types(loaded) == module_types(quantized)
    assert quantization_config(loaded) == quantization_config(quantized)
    assert tied_lm_head(loaded) is tied_lm_head(quantized)
    if tied_lm_head(quantized):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert loaded.lm_head.weight_scale is loaded.model.embed_tokens.weight_scale
    ids = token_ids(7)
    with torch.no_grad():
        assert torch.equal(loaded(ids), quantized(ids))


def test_roundtrip_loads_in_bfloat16_with_the_fast_kernel(tmp_path):
    quantized = quantize_int8(small_model(8), include_embedding=True)
    qwen3.save_model(quantized, tmp_path)
    loaded = qwen3.load_model(tmp_path, dtype=torch.bfloat16)
    int8 = {name: t for name, t in loaded.state_dict().items() if t.dtype == torch.int8}
    assert set(int8) == {name for name, t in quantized.state_dict().items() if t.dtype == torch.int8}
    assert all(t.dtype == torch.bfloat16 for name, t in loaded.state_dict().items() if name not in int8)
    # safetensors hands out tensors at any byte offset; the int8pack kernel needs 16-byte aligned weights
    assert all(t.data_ptr() % 16 == 0 for t in int8.values())
    ids = token_ids(8, shape=(1, 4))
    expected = copy.deepcopy(quantized).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(ids), expected(ids))


def test_generate_runs_on_an_int8_model():
    """Greedy generation with the KV cache equals argmax over full forwards; the cache must be float."""
    model = quantize_int8(small_model(9))
    prompt = token_ids(9, shape=(1, 5))
    tokens = qwen3.generate(model, prompt, max_new_tokens=4)
    ids = prompt
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, ids[:, 5:])
