"""The Triton paged-attention kernels against an independent float64 dense reference.

On CUDA the kernels run compiled (bf16 and fp32). Without CUDA they run in Triton's interpreter on CPU tensors:
TRITON_INTERPRET=1 must be set before triton is first imported, so test_kernels_in_triton_interpreter re-runs this
file in a subprocess with it set (the other tests skip in the parent). Skipped when triton is not installed (it is
not in the test extra). Interpreter cases are kept small.

Every case draws a fresh random pool whose unused slots hold NaN, random shuffled (non-contiguous) block tables whose
unused entries point at an all-NaN block, and sequence lengths around block boundaries: a kernel that reads a key it
should not gets NaN in its output.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from conftest import run_in_triton_interpreter, triton_test_mode

triton = pytest.importorskip("triton")

_, DEVICE, RUN_KERNELS, kernel_test = triton_test_mode()
KERNELS_PATH = Path(__file__).resolve().parents[1] / "src" / "qwen3" / "engine" / "triton_kernels.py"


def _load_kernels():
    """The kernels module loaded by path (it needs no qwen3.engine package)."""
    spec = importlib.util.spec_from_file_location("_qwen3_triton_kernels_under_test", KERNELS_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tk = _load_kernels() if RUN_KERNELS else None


@pytest.mark.skipif(RUN_KERNELS, reason="the kernels run in this process")
def test_kernels_in_triton_interpreter():
    run_in_triton_interpreter(__file__, select="not in_triton_interpreter")


# Triton 3.6's interpreter computes bf16 dot products wrongly (on raw bits), so on CPU fp16 stands in for the
# half-precision path (the same code: fp32 accumulation, p cast to the value dtype).
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]
HALF = DTYPES[1]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # ||out - ref|| / ||ref||, float64 ref


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_pool(gen, seq_lens, *, nkv, d, block_size, dtype, spare_blocks=3):
    """A NaN-filled KV pool, random K/V for each sequence's first seq_len slots, shuffled block tables."""
    need = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks + 1
    perm = torch.randperm(num_blocks, generator=gen)
    poison = perm[-1].item()  # an all-NaN block that unused table entries point at
    width = max(max(need, default=0), 1) + 1
    block_tables = torch.full((len(seq_lens), width), poison, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, nkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    used = 0
    for s, (n, nb) in enumerate(zip(seq_lens, need, strict=True)):
        block_tables[s, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
        for t in range(n):
            b, o = block_tables[s, t // block_size].item(), t % block_size
            k_cache[b, o] = torch.randn(nkv, d, generator=gen).to(dtype)
            v_cache[b, o] = torch.randn(nkv, d, generator=gen).to(dtype)
    return k_cache.to(DEVICE), v_cache.to(DEVICE), block_tables.to(DEVICE)


def dense_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """float64 causal attention: gather each sequence's keys by position, mask by position, softmax."""
    q, k_cache, v_cache = q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu()
    block_tables, seq_lens, query_start_loc = block_tables.cpu(), seq_lens.cpu(), query_start_loc.cpu()
    n, nh, d = q.shape
    block_size, nkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(n, nh, d, dtype=torch.float64)
    for s in range(len(seq_lens)):
        length, q0, q1 = seq_lens[s].item(), query_start_loc[s].item(), query_start_loc[s + 1].item()
        if q1 == q0 or length == 0:
            continue  # no queries, or a padding row with no keys: zeros
        pos = torch.arange(length)
        blocks = block_tables[s, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].repeat_interleave(nh // nkv, dim=1)  # (L, nh, D)
        v = v_cache[blocks, pos % block_size].repeat_interleave(nh // nkv, dim=1)
        q_pos = length - (q1 - q0) + torch.arange(q1 - q0)
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1], k) * scale
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


# (context_len, query_len) per sequence: chunks around block boundaries (block_size 16), a long-ish prefill,
# single-token decodes, a sequence with no queries, a graph padding row (no keys, no queries).
PREFILL_SPECS = [(0, 17), (15, 1), (16, 16), (31, 2), (0, 1), (40, 0), (0, 0), (3, 29), (47, 1)]


@kernel_test
@pytest.mark.parametrize("g,d,dtype", [(1, 64, torch.float32), (2, 128, torch.float32), (8, 64, torch.float32),
                                       (2, 128, HALF), (8, 64, HALF)])
def test_paged_attention_matches_dense(g, d, dtype):
    gen = torch.Generator().manual_seed(1000 * g + d)
    nkv, block_size = 2, 16
    specs = PREFILL_SPECS if g != 8 else PREFILL_SPECS[:5]  # the interpreter is slow with 16 query heads
    seq_lens = [c + n for c, n in specs]
    k_cache, v_cache, block_tables = make_pool(gen, seq_lens, nkv=nkv, d=d, block_size=block_size, dtype=dtype)
    query_lens = torch.tensor([n for _, n in specs])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.long), query_lens.cumsum(0)]).to(torch.int32)
    q = torch.randn(int(query_lens.sum()), nkv * g, d, generator=gen).to(dtype).to(DEVICE)
    scale = d ** -0.5
    args = (block_tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), query_start_loc.to(DEVICE))
    out = tk.paged_attention(q, k_cache, v_cache, *args, scale, max(n for _, n in specs), max(seq_lens))
    ref = dense_reference(q, k_cache, v_cache, *args, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOLERANCE[dtype]


@kernel_test
def test_paged_attention_padding_row_without_keys_gives_zeros():
    """A graph padding row (one query, seq_len 0) reads nothing and gives finite zeros."""
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, block_tables = make_pool(gen, [20, 0], nkv=1, d=64, block_size=16, dtype=torch.float32)
    q = torch.randn(3, 2, 64, generator=gen).to(DEVICE)
    seq_lens = torch.tensor([20, 0], dtype=torch.int32, device=DEVICE)
    query_start_loc = torch.tensor([0, 2, 3], dtype=torch.int32, device=DEVICE)
    out = tk.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, 0.125, 2, 20)
    ref = dense_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, 0.125)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(out[2].cpu(), torch.zeros(2, 64))


@kernel_test
@pytest.mark.parametrize("g,d,num_splits,block_size,dtype",
                         [(1, 128, 1, 16, torch.float32), (2, 128, 4, 32, torch.float32), (8, 64, 3, 8, torch.float32),
                          (2, 64, 8, 16, torch.float32), (2, 128, 4, 32, HALF), (8, 64, 1, 8, HALF)])
def test_paged_decode_matches_dense(g, d, num_splits, block_size, dtype):
    gen = torch.Generator().manual_seed(100 * g + d + num_splits)
    nkv = 2
    seq_lens = [1, 16, 17, 0, 33, 64, 5]  # block boundaries, a padding row (0), more splits than tiles
    k_cache, v_cache, block_tables = make_pool(gen, seq_lens, nkv=nkv, d=d, block_size=block_size, dtype=dtype)
    q = torch.randn(len(seq_lens), nkv * g, d, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = d ** -0.5
    out = tk.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, scale, num_splits)
    one_query_each = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    ref = dense_reference(q, k_cache, v_cache, block_tables, lens, one_query_each, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOLERANCE[dtype]
    assert torch.equal(out[3].float().cpu(), torch.zeros(nkv * g, d))  # the padding row


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 256])
def test_larger_random_batches_on_cuda(block_size, dtype):
    """Qwen3-0.6B's heads (16 query, 8 KV, D 128), longer contexts, chunked prefill over cached prefixes."""
    gen = torch.Generator().manual_seed(block_size)
    nkv, g, d = 8, 2, 128
    specs = [(int(c), int(n)) for c, n in zip(torch.randint(0, 700, (12,), generator=gen),
                                              torch.randint(1, 300, (12,), generator=gen), strict=True)]
    specs += [(0, 0), (255, 1), (256, 257)]
    seq_lens = [c + n for c, n in specs]
    k_cache, v_cache, block_tables = make_pool(gen, seq_lens, nkv=nkv, d=d, block_size=block_size, dtype=dtype)
    query_lens = torch.tensor([n for _, n in specs])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), query_lens.cumsum(0)]).to(torch.int32).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(int(query_lens.sum()), nkv * g, d, generator=gen).to(dtype).to(DEVICE)
    out = tk.paged_attention(q, k_cache, v_cache, block_tables, lens, starts, d ** -0.5, int(query_lens.max()),
                             max(seq_lens))
    assert rel_err(out, dense_reference(q, k_cache, v_cache, block_tables, lens, starts, d ** -0.5)) < TOLERANCE[dtype]
    q_dec = q[: len(specs)].contiguous()
    one_each = torch.arange(len(specs) + 1, dtype=torch.int32)
    ref = dense_reference(q_dec, k_cache, v_cache, block_tables, lens, one_each, d ** -0.5)
    for num_splits in (1, 7, tk.decode_num_splits(len(specs), nkv, max(seq_lens))):
        out = tk.paged_decode_attention(q_dec, k_cache, v_cache, block_tables, lens, d ** -0.5, num_splits)
        assert rel_err(out, ref) < TOLERANCE[dtype], num_splits


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_decode_in_a_cuda_graph_follows_new_seq_lens():
    """Captured once, replayed after seq_lens (and the block tables) changed in place: same as an eager call."""
    gen = torch.Generator().manual_seed(11)
    nkv, g, d, block_size, num_seqs = 8, 2, 128, 16, 24
    k_cache, v_cache, block_tables = make_pool(gen, [300] * num_seqs, nkv=nkv, d=d, block_size=block_size,
                                               dtype=torch.bfloat16)
    lens = torch.full((num_seqs,), 300, dtype=torch.int32, device=DEVICE)
    q = torch.randn(num_seqs, nkv * g, d, generator=gen).to(torch.bfloat16).to(DEVICE)
    num_splits = 4

    def call():
        return tk.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, d ** -0.5, num_splits)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile before capturing
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = call()
    new_lens = torch.randint(0, 301, (num_seqs,), generator=gen, dtype=torch.int32)
    new_lens[:3] = torch.tensor([0, 1, 300], dtype=torch.int32)
    lens.copy_(new_lens)
    block_tables.copy_(block_tables.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_out, call())
    assert torch.equal(graph_out[0], torch.zeros_like(graph_out[0]))


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_slots_and_skips_negative(dtype):
    gen = torch.Generator().manual_seed(7)
    num_blocks, block_size, nkv, d, n = 6, 16, 2, 64, 21
    k_cache = torch.randn(num_blocks, block_size, nkv, d, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, nkv, d, generator=gen).to(dtype).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(torch.int32)
    slots[[2, 9, 20]] = -1  # padding rows
    # k/v as non-contiguous views, the way a fused projection hands them over
    kv = torch.randn(n, 2, nkv, d, generator=gen).to(dtype).to(DEVICE)
    k, v = kv[:, 0], kv[:, 1]
    want_k, want_v = k_cache.clone().view(-1, nkv, d), v_cache.clone().view(-1, nkv, d)
    keep = slots >= 0
    want_k[slots[keep].long()] = k[keep.to(DEVICE)]
    want_v[slots[keep].long()] = v[keep.to(DEVICE)]
    tk.store_kv(k, v, k_cache, v_cache, slots.to(DEVICE))
    assert torch.equal(k_cache.view(-1, nkv, d), want_k)
    assert torch.equal(v_cache.view(-1, nkv, d), want_v)


@kernel_test
@pytest.mark.parametrize("dtype,rope_scaling", [(torch.float32, None), (HALF, None),
                                                (HALF, {"rope_type": "yarn", "factor": 4.0})])  # fmt: skip
def test_qk_norm_rope_store_matches_the_model_and_store_kv(dtype, rope_scaling):
    """The fused kernel against the model's own QKNormRoPE (RMSNorm modules, RotaryEmbedding tables) followed by the
    reference store_kv: the same q out, the same pool after (written slots, skipped padding rows, NaN elsewhere)."""
    from qwen3.config import Qwen3Config
    from qwen3.engine.attention import store_kv
    from qwen3.model import QKNormRoPE, RMSNorm, RotaryEmbedding

    gen = torch.Generator().manual_seed(11)
    nh, nkv, d, n, layers, layer, num_blocks, block_size = 6, 2, 40, 13, 3, 1, 5, 4  # D/2 = 20: masked lanes
    config = Qwen3Config(head_dim=d, max_position_embeddings=512, rope_theta=10_000.0, rope_scaling=rope_scaling)
    rope = RotaryEmbedding(config).to(DEVICE)
    norms = [RMSNorm(d, eps) for eps in (1e-6, 1e-5)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(1 + 0.3 * torch.randn(d, generator=gen))
    q_norm, k_norm = (norm.to(DEVICE, dtype) for norm in norms)
    # q, k, v as the model hands them over: views of one projection's output rows
    qkv = (3 * torch.randn(n, (nh + 2 * nkv) * d, generator=gen)).to(dtype).to(DEVICE)
    q, k, v = (x.view(n, -1, d) for x in qkv.split([nh * d, nkv * d, nkv * d], dim=1))
    positions = torch.randint(0, 512, (n,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(torch.int32)
    slots[[0, 7]] = -1  # padding rows: q is still computed, nothing is stored
    slots = slots.to(DEVICE)
    pool = torch.full((2, layers, num_blocks, block_size, nkv, d), float("nan"), dtype=dtype, device=DEVICE)
    want_pool = pool.clone()

    with torch.no_grad():
        want_q, want_k = QKNormRoPE(q_norm, k_norm, rope)(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                          positions[None])  # (1, heads, n, D)  # fmt: skip
    want_q, want_k = want_q[0].transpose(0, 1), want_k[0].transpose(0, 1)
    store_kv(want_k, v, want_pool[0, layer], want_pool[1, layer], slots)
    got_q = tk.qk_norm_rope_store(q, k, v, positions, q_norm.weight, k_norm.weight, q_norm.eps, k_norm.eps,
                                  rope.cos, rope.sin, pool, layer, slots)  # fmt: skip

    assert got_q.shape == (n, nh, d) and got_q.is_contiguous()
    tolerance = TOLERANCE[dtype]
    assert rel_err(got_q, want_q.double().cpu()) < tolerance
    assert torch.equal(pool.isnan(), want_pool.isnan())  # exactly the slots of the kept rows written, in this layer
    written = ~want_pool.isnan()
    assert rel_err(pool[written], want_pool[written].double().cpu()) < tolerance
    assert torch.equal(pool[1][written[1]], want_pool[1][written[1]])  # values: copied, not computed


@kernel_test
def test_bad_arguments_name_what_is_wrong():
    k_cache = torch.zeros(2, 16, 2, 64, device=DEVICE)
    q = torch.zeros(3, 4, 64, device=DEVICE)
    bt = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        tk.paged_decode_attention(q, k_cache, k_cache, bt, torch.ones(3, dtype=torch.int64, device=DEVICE), 1.0, 1)
    with pytest.raises(ValueError, match="num_splits"):
        tk.paged_decode_attention(q, k_cache, k_cache, bt, torch.ones(3, dtype=torch.int32, device=DEVICE), 1.0, 0)
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        tk.paged_decode_attention(q[:, :3], k_cache, k_cache, bt, torch.ones(3, dtype=torch.int32, device=DEVICE),
                                  1.0, 1)
    many = q[:1].expand(tk.MAX_DECODE_SEQS + 1, -1, -1)  # one row more than the grid's second dimension holds
    with pytest.raises(ValueError, match="65536 sequences in one call, more than the 65535"):
        tk.paged_decode_attention(many, k_cache, k_cache, bt, torch.ones(3, dtype=torch.int32, device=DEVICE), 1.0, 1)
    pool = torch.zeros(2, 3, 2, 16, 2, 64, device=DEVICE)
    w, table = torch.ones(64, device=DEVICE), torch.zeros(10, 32, device=DEVICE)
    pos, slots = torch.zeros(3, dtype=torch.int64, device=DEVICE), torch.zeros(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="layer 3 is not in 0..2"):
        tk.qk_norm_rope_store(q, q[:, :2], q[:, :2], pos, w, w, 1e-6, 1e-6, table, table, pool, 3, slots)
    with pytest.raises(ValueError, match=r"k \(3, 4, 64\) and v \(3, 4, 64\) must both be \(3, 2, 64\)"):
        tk.qk_norm_rope_store(q, q, q, pos, w, w, 1e-6, 1e-6, table, table, pool, 0, slots)
    with pytest.raises(ValueError, match=r"cos must be an fp32 \(positions, 32\) table"):
        tk.qk_norm_rope_store(q, q[:, :2], q[:, :2], pos, w, w, 1e-6, 1e-6, table[:, :16], table, pool, 0, slots)
    with pytest.raises(ValueError, match=r"positions must be \(3,\) int32 or int64"):
        tk.qk_norm_rope_store(q, q[:, :2], q[:, :2], pos.float(), w, w, 1e-6, 1e-6, table, table, pool, 0, slots)
    with pytest.raises(ValueError, match=r"q has shape \(3, 4, 32\)"):
        tk.paged_attention(q[..., :32], k_cache, k_cache, bt, torch.ones(3, dtype=torch.int32, device=DEVICE),
                           torch.arange(4, dtype=torch.int32, device=DEVICE), 1.0, 1, 1)


@kernel_test
def test_decode_num_splits_is_a_power_of_two_in_range():
    for num_seqs in (1, 3, 64, 256):
        for max_seq_len in (1, 300, 4096, 40960):
            n = tk.decode_num_splits(num_seqs, 8, max_seq_len)
            assert 1 <= n <= 64 and n & (n - 1) == 0
    assert tk.decode_num_splits(1, 8, 4096) > 1 and tk.decode_num_splits(256, 8, 4096) == 1


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_up_runs_every_configuration_and_leaves_the_cache_alone(dtype):
    gen = torch.Generator().manual_seed(7)
    k_cache = torch.randn(4, 16, 2, 32, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(4, 16, 2, 32, generator=gen).to(dtype).to(DEVICE)
    before = (k_cache.clone(), v_cache.clone())
    tk.warm_up(k_cache, v_cache, group=2, dtype=dtype)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
