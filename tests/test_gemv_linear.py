"""use_gemv (qwen3.kernels.gemv_linear): the Triton GEMV behind the model's projections, against the plain modules.

Without the kernel (CPU, plain process): the swap keeps every Parameter (same objects, same state_dict keys, the
tied LM head still the embedding's matrix, int8 scales too), the swapped model computes exactly what it did, and
remove_gemv swaps back. Through the kernel (tests named *triton*: on CUDA, or on the CPU in a TRITON_INTERPRET=1
subprocess with allow_cpu=True): logits and greedy tokens of the swapped fp32 model against the plain one and a
float64 copy, the int8 path against Int8Linear's plain forward and float64, which rows take the op (a dispatch
mode records the calls), torch.compile with a static and a dynamic row count, and the CPU engine's greedy tokens.
On CUDA: the engine with its CUDA graphs on the swapped model gives the plain engine's greedy tokens.

Rounding bound for one projection, as in test_kernels.py: fp32 accumulation of K products is within
(K + 3) 2^-24 sum_k |x_k w_nk| of the exact sum, for the kernel and for F.linear alike.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import qwen3
from conftest import SMALL, fix_triton_interpreter_scalars, randomize, rel_error, run_in_triton_interpreter
from qwen3.quantize import Int8Linear, quantize_int8, quantize_per_row, set_int8_kernel

pytest.importorskip("triton")

from qwen3.kernels import gemv_triton  # noqa: E402 - triton first
from qwen3.kernels.gemv_linear import (  # noqa: E402
    GEMV_MAX_ROWS,
    GemvInt8Linear,
    GemvLinear,
    remove_gemv,
    use_gemv,
)
from qwen3.kernels.gemv_triton import gemv_max_tiles  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # set before triton is first imported
RUN_TRITON = CUDA or INTERPRETED
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
ALLOW_CPU = DEVICE == "cpu"  # the interpreter runs the kernel on CPU tensors
FP32_U = 2.0**-24
triton_test = pytest.mark.skipif(not RUN_TRITON, reason="runs in the TRITON_INTERPRET=1 subprocess (test below)")
needs_cuda = pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs CUDA")
PROJECTIONS = 4  # qkv (fused), o, gate_up (fused), down per layer


def small_model(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> qwen3.Qwen3ForCausalLM:
    model = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config(**SMALL))
    randomize(model, seed)
    return model.to(device=device, dtype=dtype).eval()


def random_ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


class OpCalls(TorchDispatchMode):
    """Counts the calls of torch.ops.qwen3.gemv."""

    def __init__(self) -> None:
        super().__init__()
        self.gemv = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.gemv += str(func).startswith("qwen3.gemv")
        return func(*args, **(kwargs or {}))


def projection_bound(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """(K + 3) 2^-24 sum_k |x_k w_nk| (times |s_n|): one fp32 accumulation's error bound, per output."""
    K = w.shape[1]
    bound = (K + 3) * FP32_U * (x.double().reshape(-1, K).abs() @ w.double().abs().T)
    return bound if s is None else bound * s.double().abs()


# ---------------------------------------------------------------------------------------------------
# The swap, without running the kernel


def test_swap_keeps_parameters_names_and_tying():
    model = small_model()
    before = model.state_dict(keep_vars=True)
    ids = random_ids(20, seed=1)
    with torch.no_grad():
        plain = model(ids)
    count = use_gemv(model)
    layers = SMALL["num_hidden_layers"]
    assert count == PROJECTIONS * layers + 1  # and the LM head
    assert isinstance(model.lm_head, GemvLinear) and model.lm_head.weight is model.model.embed_tokens.weight
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)  # the same Parameters
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert not any(m.training for m in model.modules())  # eval mode kept
    with torch.no_grad():
        assert torch.equal(model(ids), plain)  # on the CPU the modules compute exactly F.linear
    swapped = [m for m in model.modules() if isinstance(m, GemvLinear)]
    for m in swapped:  # the split-K counters: zero, int32, on the weight's device, sized for max_rows
        assert m.counters.dtype == torch.int32 and m.counters.device == m.weight.device and not m.counters.any()
        assert m.counters.numel() == gemv_max_tiles(GEMV_MAX_ROWS, m.out_features)
    assert use_gemv(model, max_rows=4) == count and model.lm_head.max_rows == 4  # again: new settings, no re-wrap
    assert use_gemv(model, max_rows=40) == count  # more rows than 16: the counters grow to fit
    assert all(m.counters.numel() == gemv_max_tiles(40, m.out_features) for m in swapped)
    assert list(model.state_dict()) == list(before)  # not saved
    assert remove_gemv(model) == count
    assert use_gemv(model, lm_head=False) == count - 1 and type(model.lm_head) is nn.Linear
    assert remove_gemv(model) == count - 1
    assert all(type(m) is not GemvLinear for m in model.modules())
    assert not any(name.endswith("counters") for name, _ in model.named_buffers())  # gone with the modules
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(v is before[k] for k, v in model.state_dict(keep_vars=True).items())


def test_swap_of_int8_modules_keeps_the_tied_int8_head():
    model = quantize_int8(small_model(seed=2), include_embedding=True)
    set_int8_kernel(model, "plain")  # no CPU kernel build here; the plain formula is what is compared
    ids = random_ids(6, seed=3)
    with torch.no_grad():
        plain = model(ids)
    before = model.state_dict(keep_vars=True)
    assert use_gemv(model) == PROJECTIONS * SMALL["num_hidden_layers"] + 1
    head, embedding = model.lm_head, model.model.embed_tokens
    assert isinstance(head, GemvInt8Linear) and isinstance(head, Int8Linear)
    assert head.weight is embedding.weight and head.weight_scale is embedding.weight_scale
    assert head.kernel == "plain"
    assert all(v is before[k] for k, v in model.state_dict(keep_vars=True).items())
    assert qwen3.quantize.quantization_config(model) is not None  # still an int8 model to save
    with torch.no_grad():
        assert torch.equal(model(ids), plain)
    assert remove_gemv(model) == PROJECTIONS * SMALL["num_hidden_layers"] + 1
    assert type(model.lm_head) is Int8Linear and model.lm_head.weight_scale is embedding.weight_scale


def test_subclasses_are_left_alone_and_bad_settings_rejected():
    class Special(nn.Linear):  # e.g. a tensor-parallel linear: its forward does more than F.linear
        pass

    model = nn.Sequential(nn.Linear(8, 4, bias=False), Special(4, 4))
    assert use_gemv(model) == 1 and type(model[1]) is Special
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="max_rows"):
            use_gemv(model, max_rows=bad)


def test_gradients_take_the_plain_path():
    layer = GemvLinear(nn.Linear(16, 8, bias=True), allow_cpu=True)  # the kernel has no backward
    x = torch.randn(2, 16, requires_grad=True)
    with OpCalls() as calls:
        layer(x).sum().backward()
    assert calls.gemv == 0 and x.grad is not None and layer.weight.grad is not None


# ---------------------------------------------------------------------------------------------------
# Through the kernel (CUDA, or the interpreter on the CPU)


@pytest.fixture(scope="module")
def interpreter():
    if INTERPRETED:
        fix_triton_interpreter_scalars()


@pytest.mark.skipif(RUN_TRITON, reason="the Triton kernels run in this process")
def test_gemv_linear_triton_in_interpreter():
    run_in_triton_interpreter(__file__, select="triton and not in_interpreter")


@triton_test
def test_triton_swapped_model_equals_the_plain_model(interpreter):
    """fp32 logits at 1 row (the CUDA-core path) and 5 rows (tl.dot, ieee) against the plain model, both within
    the same distance of a float64 copy; every projection and the LM head took the op; greedy tokens equal."""
    model = small_model(seed=4, device=DEVICE)
    model64 = copy.deepcopy(model).double()
    plain = copy.deepcopy(model)
    assert use_gemv(model, allow_cpu=ALLOW_CPU) == PROJECTIONS * SMALL["num_hidden_layers"] + 1
    for rows in (1, 5):
        ids = random_ids(rows, seed=rows).to(DEVICE)
        with torch.no_grad(), OpCalls() as calls:
            fast = model(ids)
        assert calls.gemv == PROJECTIONS * SMALL["num_hidden_layers"] + 1
        with torch.no_grad():
            slow, exact = plain(ids), model64(ids)
        err_plain, err_fast = rel_error(slow, exact), rel_error(fast, exact)
        assert err_plain < 1e-5 and err_fast < 1e-5, (err_plain, err_fast)  # fp32 through 3 layers: ~1e-7
        assert rel_error(fast, slow) < 1e-5
    prompt = random_ids(7, seed=9).to(DEVICE)
    assert torch.equal(qwen3.generate(model, prompt, max_new_tokens=5), qwen3.generate(plain, prompt, 5))


class ReduceLaunches:
    """Counts the launches of the split-K reduce kernel (the GEMV's second kernel)."""

    def __init__(self) -> None:
        self.kernel, self.count = gemv_triton._splitk_reduce_kernel, 0

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        self.count += 1
        return self.kernel[grid]


@triton_test
@pytest.mark.parametrize("int8", [False, True])
def test_triton_modules_take_one_launch_and_leave_their_counters_zero(interpreter, monkeypatch, int8):
    """K = 1024 (split, int8 too): the modules' counters make each call one launch, the output bit-identical to the
    two-kernel gemv and within fp32 rounding of nn.Linear (or Int8Linear's plain path), the counters zero after
    each call."""
    gen = torch.Generator().manual_seed(11 + int8)
    linear = nn.Linear(1024, 40, bias=not int8)
    linear.weight.data = torch.randn(40, 1024, generator=gen) / 1024**0.5
    if linear.bias is not None:
        linear.bias.data = torch.randn(40, generator=gen)
    if int8:
        plain = Int8Linear(1024, 40)
        plain.weight.data, plain.weight_scale.data = quantize_per_row(linear.weight.data)
        plain = plain.to(DEVICE)
        fast, scale = GemvInt8Linear(plain, allow_cpu=ALLOW_CPU), plain.weight_scale
    else:
        plain = linear.to(DEVICE)
        fast, scale = GemvLinear(plain, allow_cpu=ALLOW_CPU), None
    launches = ReduceLaunches()
    monkeypatch.setattr(gemv_triton, "_splitk_reduce_kernel", launches)
    for rows in (1, 5, 1):
        x = torch.randn(rows, 1024, generator=gen).to(DEVICE)
        with torch.no_grad(), OpCalls() as calls:
            y = fast(x)
            want = plain.forward_plain(x) if int8 else plain(x)
        assert calls.gemv == 1 and launches.count == 0 and not fast.counters.any()
        two = gemv_triton.gemv(x, fast.weight, scale)  # the two-kernel path
        assert launches.count == 1
        launches.count = 0
        assert torch.equal(y, two if int8 else two + fast.bias)
        exact = x.double() @ fast.weight.double().T
        exact = exact * scale.double() if int8 else exact + fast.bias.double()
        bound = projection_bound(x, fast.weight, scale) + 2 * FP32_U * exact.abs()  # scale or bias: one rounding
        assert ((y.double() - exact).abs() <= bound).all()
        assert ((want.double() - exact).abs() <= bound).all()


@triton_test
def test_triton_rows_above_the_threshold_take_f_linear(interpreter):
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    layer = GemvLinear(nn.Linear(40, 24, bias=False, device="meta"), max_rows=4, allow_cpu=ALLOW_CPU)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    for shape, takes in (((1, 40), True), ((2, 2, 40), True), ((5, 40), False), ((1, GEMV_MAX_ROWS, 40), False)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(DEVICE)
        with torch.no_grad(), OpCalls() as calls:
            y = layer(x)
        assert y.shape == (*shape[:-1], 24)
        assert calls.gemv == int(takes), shape
        if takes:
            assert ((y - x @ weight.T).double().abs() <= projection_bound(x, weight).view(y.shape) * 2).all()
        else:
            assert torch.equal(y, torch.nn.functional.linear(x, weight))


@triton_test
@pytest.mark.parametrize("rows", [1, 3])
def test_triton_int8_path_against_int8_linear_plain(interpreter, rows):
    gen = torch.Generator().manual_seed(rows)
    module = Int8Linear(72, 40)
    module.weight.data, module.weight_scale.data = quantize_per_row(torch.randn(40, 72, generator=gen))
    module = module.to(DEVICE)
    q, s = module.weight, module.weight_scale
    fast = GemvInt8Linear(module, allow_cpu=ALLOW_CPU)
    x = torch.randn(1, rows, 72, generator=gen).to(DEVICE)
    with torch.no_grad(), OpCalls() as calls:
        y = fast(x)
        y_plain = module.forward_plain(x)
    assert calls.gemv == 1 and y.shape == y_plain.shape == (1, rows, 40)
    exact = (x.double().reshape(-1, 72) @ q.double().T) * s.double()
    bound = projection_bound(x, q, s) + FP32_U * exact.abs()  # the scale multiplies once, rounded
    assert ((y.double().reshape(exact.shape) - exact).abs() <= bound).all()
    assert ((y_plain.double().reshape(exact.shape) - exact).abs() <= bound).all()
    many = torch.randn(GEMV_MAX_ROWS + 1, 72, generator=gen).to(DEVICE)
    with torch.no_grad(), OpCalls() as calls:
        assert torch.equal(fast(many), module(many))  # prefill: Int8Linear's own path
    assert calls.gemv == 0


@triton_test
def test_triton_compiled_forward_static_and_dynamic_rows(interpreter):
    """torch.compile (fullgraph; aot_eager on the CPU): a static row count <= max_rows puts the opaque op in the
    graph; a dynamic one (the engine marks its batch dynamic) takes F.linear and adds no guard on it."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    layer = GemvLinear(nn.Linear(32, 16, bias=False), allow_cpu=ALLOW_CPU).to(DEVICE)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager" if DEVICE == "cpu" else "inductor")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    with torch.no_grad():
        x = torch.randn(1, 1, 32, device=DEVICE)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
        assert "qwen3.gemv" in counter.graphs[-1].code
        x = torch.randn(1, 20, 32, device=DEVICE)
        torch._dynamo.mark_dynamic(x, 1)
        torch.testing.assert_close(compiled(x), torch.nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-6)
        assert "qwen3.gemv" not in counter.graphs[-1].code
        small = torch.randn(1, 3, 32, device=DEVICE)
        torch._dynamo.mark_dynamic(small, 1)
        compiled(small)  # within the dynamic graph's range: no recompile
    assert counter.frame_count == 2


@triton_test
@pytest.mark.skipif(CUDA and not INTERPRETED, reason="the CPU engine; CUDA has its graph test below")
def test_triton_cpu_engine_on_the_swapped_model(interpreter):
    """The engine (reference kernels, CPU) drives the swapped model: prefill chunks of <= 16 tokens and the decode
    steps take the op; greedy tokens equal the plain engine's."""
    model = small_model(seed=6)
    prompts = [random_ids(n, seed=n)[0].tolist() for n in (3, 11)]
    params = qwen3.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def run() -> list[list[int]]:
        llm = qwen3.LLM(model, kv_cache_tokens=256, block_size=8)
        return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    want = run()
    use_gemv(model, allow_cpu=True)
    with OpCalls() as calls:
        assert run() == want
    assert calls.gemv > 0


# ---------------------------------------------------------------------------------------------------
# CUDA: the engine with its CUDA graphs


@needs_cuda
@pytest.mark.parametrize("int8", [False, True])
def test_engine_cuda_graphs_on_the_swapped_model(int8):
    """fp32 weights (or int8 with fp32 scales): greedy tokens of the engine with graphs, swapped against plain."""
    model = small_model(seed=8, device="cuda")
    if int8:
        quantize_int8(model)
    prompts = [random_ids(n, seed=n)[0].tolist() for n in (3, 9, 20, 1, 14)]
    params = qwen3.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run() -> list[list[int]]:
        llm = qwen3.LLM(model, max_num_seqs=8, kv_cache_tokens=1024, block_size=16, gemv=False)  # no swap of its own
        assert llm.runner.graphs  # decode replays CUDA graphs
        return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    want = run()
    assert use_gemv(model) == PROJECTIONS * SMALL["num_hidden_layers"] + 1
    assert run() == want
    assert run() == want  # a second engine on the same swapped model


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_within_rounding_of_the_plain_model(dtype):
    """bf16 / fp16 on CUDA: swapped and plain model both within a few units of the dtype's rounding of fp32."""
    model = small_model(seed=10, device="cuda", dtype=dtype)
    reference = copy.deepcopy(model).float()
    plain = copy.deepcopy(model)
    use_gemv(model)
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    for rows in (1, 16):
        ids = random_ids(rows, seed=rows).cuda()
        with torch.no_grad():
            fast, slow, exact = model(ids), plain(ids), reference(ids)
        err_plain = rel_error(slow, exact)
        assert rel_error(fast, exact) <= max(2 * err_plain, 16 * u), (rel_error(fast, exact), err_plain)
