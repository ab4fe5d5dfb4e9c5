"""LLM(compile=True) on the CPU: the torch.compile'd decode forward (engine/compiled.py) against the eager one.

The GPU path compiles the same forward with the Triton kernels as triton_ops; here the reference kernels stand in
as opaque custom ops (compiled.REFERENCE_OPS), so dynamo traces the same model, backend and pool mutation into one
graph and inductor compiles it for the CPU. The triton_ops' fake implementations are checked for shapes.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import qwen3
from conftest import record_stand_in_graphs, run_in_triton_interpreter
from qwen3.engine import LLM
from qwen3.engine.attention import REFERENCE, KVPool, PagedAttention
from qwen3.sampling import SamplingParams

compiled = pytest.importorskip("qwen3.engine.compiled")
if not hasattr(torch, "compile") or not hasattr(torch._dynamo, "mark_dynamic"):
    pytest.skip("torch.compile is not available", allow_module_level=True)

BLOCK = 4
CONFIG = qwen3.Qwen3Config.from_preset("0.6B", vocab_size=300, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=16, max_position_embeddings=2048)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = qwen3.Qwen3ForCausalLM(CONFIG).eval()
    model.init_weights(std=0.1)
    with torch.no_grad():  # norm scales drawn too, so a misplaced norm cannot hide behind 1s
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    return model


def decode_state(num_seqs: int, seed: int, num_blocks: int = 64) -> dict:
    """A decode step of num_seqs sequences of random lengths over a pool of random keys and values."""
    gen = torch.Generator().manual_seed(seed)
    width = 8
    lens = torch.randint(1, width * BLOCK + 1, (num_seqs,), generator=gen)
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * width].view(num_seqs, width).int()
    pos = lens - 1
    slots = (tables[torch.arange(num_seqs), pos // BLOCK] * BLOCK + pos % BLOCK).int()
    pool = KVPool(CONFIG.num_hidden_layers, num_blocks, BLOCK, 2, CONFIG.head_dim, torch.float32, "cpu")
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen))
    tokens = torch.randint(0, CONFIG.vocab_size, (1, num_seqs), generator=gen)
    return dict(pool=pool, tables=tables, lens=lens.int(), slots=slots, tokens=tokens, positions=pos[None].long())


def backend(state: dict, pool: KVPool, kind: type = PagedAttention, **options) -> PagedAttention:
    n = state["tokens"].shape[1]
    return kind(pool, REFERENCE, state["slots"], state["tables"], state["lens"], torch.arange(n + 1, dtype=torch.int32),
                max_query_len=1, max_seq_len=int(state["lens"].max()), decode=True, **options)  # fmt: skip


@torch.inference_mode()
def test_compiled_decode_forward_equals_eager_and_writes_the_pool(model):
    """Hidden states and the pool after the step equal the eager forward's, for batch sizes that share a compiled
    graph (the batch dimension is dynamic) while each split count gets its own (num_splits stays a Python int)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    forward = compiled.compile_decode_forward()
    for num_seqs, seed, splits in ((5, 1, 1), (3, 2, 1), (7, 3, 1), (4, 4, 2), (6, 5, 4), (2, 6, 2)):
        state = decode_state(num_seqs, seed)
        eager_pool = state["pool"]
        compiled_pool = KVPool(CONFIG.num_hidden_layers, eager_pool.num_blocks, BLOCK, 2, CONFIG.head_dim,
                               torch.float32, "cpu")  # fmt: skip
        compiled_pool.kv.copy_(eager_pool.kv)
        before = eager_pool.kv.clone()
        expected = model.hidden_states(state["tokens"], state["positions"], backend(state, eager_pool))
        with torch._dynamo.config.patch(compiled.compile_settings()):
            step = backend(state, compiled_pool, compiled.CompiledPagedAttention, ops=compiled.REFERENCE_OPS,
                           num_splits=splits)  # fmt: skip
            got = forward(model, state["tokens"], state["positions"], step)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled_pool.kv, eager_pool.kv, rtol=1e-5, atol=1e-5)
        assert not torch.equal(compiled_pool.kv, before)  # the step's keys landed in the caller's pool itself
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3  # one per split count, whatever the batch


def mixed_step(seed: int, query_lens: list[int], cached: list[int], width: int, num_blocks: int = 96) -> dict:
    """One prefill/mixed step: sequence s feeds query_lens[s] new tokens after cached[s] tokens already in the
    pool (random keys and values), its block table `width` wide; a query length of 1 is a decode row."""
    gen = torch.Generator().manual_seed(seed)
    S = len(query_lens)
    tables = torch.randperm(num_blocks, generator=gen)[: S * width].view(S, width).int()
    lens = torch.tensor([c + q for c, q in zip(cached, query_lens, strict=True)])
    assert int(lens.max()) <= width * BLOCK
    positions = torch.cat([torch.arange(c, c + q) for c, q in zip(cached, query_lens, strict=True)])
    seq = torch.repeat_interleave(torch.arange(S), torch.tensor(query_lens))
    slots = (tables[seq, positions // BLOCK] * BLOCK + positions % BLOCK).int()
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    pool = KVPool(CONFIG.num_hidden_layers, num_blocks, BLOCK, 2, CONFIG.head_dim, torch.float32, "cpu")
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen))
    tokens = torch.randint(0, CONFIG.vocab_size, (1, len(positions)), generator=gen)
    logits_index = torch.randperm(S, generator=gen)[: max(1, S // 2)].sort().values  # sequences that sample
    return dict(pool=pool, tables=tables, lens=lens.int(), slots=slots, starts=starts, tokens=tokens,
                positions=positions[None], logits_index=(starts[1:] - 1)[logits_index].long())  # fmt: skip


@torch.inference_mode()
def test_compiled_step_forward_equals_eager_over_chunk_lengths(model):
    """The forward of the steps no graph replays (prefill chunks after cached prefixes, mixed with decode rows):
    logits at the sampling rows and the pool after the step equal the eager forward's, and every step, whatever
    its token count N, sequence count S and table width W (equal to one another or not), runs the one compile."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    forward = compiled.compile_step_forward()
    bound_q, bound_len = 40, 16 * BLOCK  # what the runner passes: max_num_batched_tokens, max_model_len
    steps = [  # (query lengths, cached tokens, width): N, S, W
        ([9, 1, 1, 14], [6, 20, 3, 0], 7),  # N 25, S 4, W 7: a cached prefix, two decode rows
        ([1, 1, 1], [11, 4, 30], 9),  # N 3 = S: decode rows only
        ([5, 12], [0, 17], 8),  # N 17, S 2
        ([3, 2, 1, 1, 2, 3, 1], [0, 9, 40, 2, 5, 0, 13], 11),  # N 13, S 7
        ([6, 6, 4], [8, 0, 1], 16),  # N = W = 16
        ([2, 2], [0, 0], 2),  # N = S = W = 2
    ]
    for seed, (query_lens, cached, width) in enumerate(steps):
        state = mixed_step(seed, query_lens, cached, width)
        eager_pool, n = state["pool"], state["tokens"].shape[1]
        compiled_pool = KVPool(CONFIG.num_hidden_layers, eager_pool.num_blocks, BLOCK, 2, CONFIG.head_dim,
                               torch.float32, "cpu")  # fmt: skip
        compiled_pool.kv.copy_(eager_pool.kv)
        meta = (state["slots"], state["tables"], state["lens"], state["starts"])
        eager = PagedAttention(eager_pool, REFERENCE, *meta, max_query_len=max(query_lens),
                               max_seq_len=int(state["lens"].max()))  # fmt: skip
        expected = model(state["tokens"], state["positions"], eager, logits_index=state["logits_index"][None])[0]
        with torch._dynamo.config.patch(compiled.compile_settings()):
            step = compiled.CompiledPagedAttention(compiled_pool, REFERENCE, *meta, max_query_len=bound_q,
                                                   max_seq_len=bound_len, ops=compiled.REFERENCE_OPS)  # fmt: skip
            hidden = forward(model, state["tokens"], state["positions"], step)
        assert hidden.shape == (1, n, CONFIG.hidden_size)
        got = model.lm_head(hidden[0, state["logits_index"]])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled_pool.kv, eager_pool.kv, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1




def record_logits(llm: LLM) -> list:
    """Wrap llm.runner.run to keep each step's (sequences, tokens, decode?) and logits (a copy) in the list returned."""
    steps, run = [], llm.runner.run

    def recorded(batch, in_flight=None):
        logits, sampling = run(batch, in_flight)
        steps.append(((len(batch.seqs), batch.num_tokens, batch.is_decode), logits.clone()))
        return logits, sampling

    llm.runner.run = recorded
    return steps


def test_engine_compiled_on_cpu(model, monkeypatch):
    """The runner with compile=True (config.compile, the internal switch; LLM refuses compile=True on the CPU):
    decode graphs for buckets 2, 4, 8 (one sequence replays bucket 2) and the compiled forward of every other step,
    driven through generate with chunked prompts, prefix-cache hits, mixed steps, a step of one sequence and one
    token (padded) and chunks that sample nothing; then again with no graphs (decode through the compiled step).
    Every step's logits equal the eager engine's, the pools end equal, greedy tokens equal qwen3.generate's, and
    there are two compiles in all (the step forward's, the decode graphs')."""
    record_stand_in_graphs(monkeypatch)
    kwargs = dict(max_num_seqs=8, kv_cache_tokens=512, block_size=BLOCK, max_num_batched_tokens=24, max_model_len=64)
    eager = LLM(model, **kwargs)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fused = LLM(model, **kwargs)
    fused.config.compile = True
    fused.runner.compile_step_forward()
    fused.runner.capture_graphs()
    assert list(fused.runner.graphs) == [2, 4, 8]
    for llm in (eager, fused):
        llm.pool.kv.zero_()  # the CPU pool starts uninitialised; the test compares pools at the end
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, CONFIG.vocab_size, (12,), generator=gen).tolist()  # 3 blocks

    def draw(n):
        return torch.randint(0, CONFIG.vocab_size, (n,), generator=gen).tolist()

    rounds = [  # (prompts, max_tokens), one generate call each
        ([prefix + draw(5)], [3]),
        ([prefix + draw(1)], [4]),  # 12 cached tokens: a decode row from the start, one sequence in bucket 2
        ([draw(3), prefix + draw(19), draw(40), prefix[:8] + draw(6), draw(9)], [6, 3, 5, 8, 2]),  # chunks, mixed
        ([draw(50)], [2]),  # two chunks of 24 tokens that sample nothing, then the last 2 tokens
    ]
    no_graphs = ([draw(7), prefix + draw(2), draw(30)], [5, 6, 9])  # every decode step through the step forward
    outs = {}
    for name, llm in (("eager", eager), ("fused", fused)):
        steps = record_logits(llm)
        outs[name] = []
        for prompts, max_tokens in [*rounds, no_graphs]:
            if prompts is no_graphs[0]:
                llm.runner.graphs = {}
                first_without_graphs = len(steps)
            params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n) for n in max_tokens]
            outs[name] += [(p, n, out.token_ids, out.num_cached_tokens) for p, n, out in
                           zip(prompts, max_tokens, llm.generate(prompts, params, use_tqdm=False), strict=True)]
        outs[name + " steps"] = steps
        llm.block_manager.check_all_free()
    assert len(outs["eager steps"]) == len(outs["fused steps"]) > 20
    for (kind, want), (fused_kind, got) in zip(outs["eager steps"], outs["fused steps"], strict=True):
        assert kind == fused_kind
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.pool.kv, eager.pool.kv, rtol=1e-5, atol=1e-5)
    assert outs["eager"] == outs["fused"]
    for prompt, n, token_ids, _ in outs["fused"]:
        assert token_ids == qwen3.generate(model, [prompt], n)[0].tolist()
    kinds = [kind for kind, _ in outs["fused steps"]]
    assert (1, 17, False) in kinds  # one sequence's chunk (padded to two sequences)
    assert (1, 1, True) in kinds[:first_without_graphs]  # a 12-token cache hit + 1: one decode row, in bucket 2
    assert (1, 1, True) in kinds[first_without_graphs:]  # one decode row through the step forward (padded)
    assert any(not decode and s > 1 and n > s for s, n, decode in kinds)  # chunks beside decode rows
    assert any(logits.shape[0] == 0 for _, logits in outs["fused steps"])  # a chunk that samples nothing
    assert [cached for *_, cached in outs["fused"]][1:4] == [12, 0, 12]  # prefix-cache hits
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_compiled_decode_buckets_take_three_split_counts_and_three_compiles(model, monkeypatch):
    """compile=True captures buckets 2, 4, 8 (no bucket 1) with the split count of 2 sequences; from 16 up, the
    buckets whose own split count is 1 (48, 64 here) share 1 split and the others (16, 32) take that of the largest
    of them (32): three compiles, one per range of batch sizes; each graph's backend holds its group's count."""
    record_stand_in_graphs(monkeypatch)
    llm = LLM(model, max_num_seqs=64, kv_cache_tokens=1024, block_size=BLOCK, max_model_len=64)
    own = {2: 5, 4: 5, 8: 5, 16: 4, 32: 3, 48: 1, 64: 1}
    monkeypatch.setattr(llm.runner, "_num_splits", lambda num_seqs, max_seq_len: own[num_seqs])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    llm.config.compile = True
    llm.runner.capture_graphs()
    assert list(llm.runner.graphs) == [2, 4, 8, 16, 32, 48, 64]
    splits = {size: graph.forward.__defaults__[1].num_splits for size, graph in llm.runner.graphs.items()}
    assert splits == {2: 5, 4: 5, 8: 5, 16: 3, 32: 3, 48: 1, 64: 1}
    assert llm.runner.graph_groups == [[2, 4, 8], [16, 32], [48, 64]]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_engine_on_cuda_equals_eager_and_generate(model):
    """On the GPU: LLM(compile=True) compiles its forwards at start (one per group of decode buckets that share a
    split count, and one for the other steps) and nothing more while it serves prompts of many lengths in chunks of
    64 tokens, with prefix-cache hits and chunks mixed with decode rows. In fp32 it gives the eager engine's and
    qwen3.generate's greedy tokens; in bf16 (where inductor may skip a rounding that eager does) the top
    log-probabilities of the first token (a compiled prefill or mixed step) and of the second (a graph replay or a
    mixed step) match the eager engine's to bf16 precision."""
    import copy

    gen = torch.Generator().manual_seed(9)
    shared = torch.randint(0, CONFIG.vocab_size, (40,), generator=gen).tolist()
    lengths = [3, 9, 17, 30, 5, 12, 1, 25, 70, 130] * 3
    prompts = [torch.randint(0, CONFIG.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    prompts = [shared[: 8 * (i % 6)] + p for i, p in enumerate(prompts)]  # prefix-cache hits from the second use
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4 + 3 * (i % 7)) for i in range(len(prompts))]
    first_steps = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=2, logprobs=5)
    for dtype in (torch.float32, torch.bfloat16):
        cuda_model = copy.deepcopy(model).to("cuda", dtype)
        kwargs = dict(max_num_seqs=32, kv_cache_tokens=8192, block_size=16, max_num_batched_tokens=64)
        eager = LLM(cuda_model, enforce_eager=True, **kwargs)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        fused = LLM(cuda_model, compile=True, **kwargs)
        assert sorted(fused.runner.graphs) == [2, 4, 8, 16, 32]
        compiles = 1 + len(fused.runner.graph_groups)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles
        if dtype == torch.float32:
            want = eager.generate(prompts, params, use_tqdm=False)
            got = fused.generate(prompts, params, use_tqdm=False)
            for prompt, p, a, b in zip(prompts, params, want, got, strict=True):
                assert a.token_ids == b.token_ids == qwen3.generate(cuda_model, [prompt], p.max_tokens)[0].tolist()
            assert any(b.num_cached_tokens for b in got)
        else:
            want = eager.generate(prompts, first_steps, use_tqdm=False)
            got = fused.generate(prompts, first_steps, use_tqdm=False)
            compared = 0
            for a, b in zip(want, got, strict=True):
                for step in (0, 1):  # 0: a compiled prefill/mixed step; 1: a graph replay, if token 0 agrees
                    if step == 1 and a.token_ids[0] != b.token_ids[0]:
                        break
                    top_a, top_b = dict(a.logprobs[step].top), dict(b.logprobs[step].top)
                    common = top_a.keys() & top_b.keys()
                    assert len(common) >= 3
                    for token in common:
                        assert abs(top_a[token] - top_b[token]) < 0.05
                    compared += 1
            assert compared >= 1.5 * len(prompts)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles  # no compile while serving
        fused.block_manager.check_all_free()


def test_compile_is_refused_where_it_cannot_run(model):
    for kwargs, words in (({"compile": True}, "needs CUDA"), ({"compile": "yes"}, "must be a bool"),
                          ({"compile": True, "enforce_eager": True}, "enforce_eager")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            LLM(model, max_num_seqs=4, kv_cache_tokens=256, **kwargs)


def test_reference_ops_pass_opcheck():
    state = decode_state(4, 7)
    pool = state["pool"]
    k_cache, v_cache = pool.layer(1)
    q = torch.randn(4, 4, CONFIG.head_dim)
    k, v = torch.randn(2, 4, 2, CONFIG.head_dim).unbind(0)
    ops = compiled.REFERENCE_OPS
    starts = torch.arange(5, dtype=torch.int32)
    torch.library.opcheck(ops.store_kv_pool, (k, v, pool.kv, 1, state["slots"]))
    torch.library.opcheck(ops.paged_decode_attention, (q, k_cache, v_cache, state["tables"], state["lens"], 0.25, 2))
    torch.library.opcheck(ops.paged_attention, (q, k_cache, v_cache, state["tables"], state["lens"], starts, 0.25, 1,
                                                int(state["lens"].max())))  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_ops_fake_shapes():
    """The triton_ops traced on fake tensors (what dynamo sees): outputs (N, nh, D) like q, the pool untouched in
    shape; no kernel runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = compiled.triton_custom_ops()
    with FakeTensorMode():
        kv = torch.empty(2, 3, 10, BLOCK, 2, 16)
        q = torch.empty(6, 4, 16)
        k = torch.empty(6, 2, 16)
        tables = torch.zeros(6, 5, dtype=torch.int32)
        lens = torch.ones(6, dtype=torch.int32)
        starts = torch.arange(7, dtype=torch.int32)
        ops.store_kv_pool(k, k, kv, 2, torch.zeros(6, dtype=torch.int32))
        for splits in (1, 4):
            out = ops.paged_decode_attention(q, kv[0, 1], kv[1, 1], tables, lens, 0.25, splits)
            assert out.shape == q.shape and out.dtype == q.dtype
        out = ops.paged_attention(q, kv[0, 1], kv[1, 1], tables, lens, starts, 0.25, 1, 20)
        assert out.shape == q.shape and out.dtype == q.dtype
        with pytest.raises(ValueError, match="layer 3"):
            ops.store_kv_pool(k, k, kv, 3, torch.zeros(6, dtype=torch.int32))
        weight, table = torch.empty(16), torch.empty(40, 8)
        out = ops.qk_norm_rope_store(q, k, k, torch.zeros(6, dtype=torch.int64), weight, weight, 1e-6, 1e-6, table,
                                     table, kv, 2, torch.zeros(6, dtype=torch.int32))  # fmt: skip
        assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("kind", ["decode", "step"])
def test_triton_ops_trace_into_one_graph_that_writes_the_pool_in_place(model, kind):
    """What inductor gets on CUDA, traced here without a GPU: the whole forward as one graph, with the batch (or
    token and sequence counts) symbolic in the Triton kernels' grids; per layer the QK-norm + RoPE + store kernel and
    the attention kernels (decode: split + reduce; the other steps: the varlen kernel); the first found to write only
    its q output and the pool (torch reads the kernels' TTIR: a stand-in driver names an sm_90 target), and after
    inductor's re-inplacing pass nothing is cloned and the pool's write-back is a copy onto itself (no pool copy)."""
    import triton
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
    from torch._inductor.fx_utils import FakeTensorUpdater
    from triton.backends.compiler import GPUTarget

    class StandInDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(lambda *args: pytest.fail("the captured graph is inspected, never run"))

    def backend_fn(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, keep_inference_input_mutations=True)

    torch._dynamo.reset()
    ops = compiled.triton_custom_ops()
    if kind == "decode":
        forward = compiled.compile_decode_forward(backend_fn)
        state = decode_state(5, 11)
        step = backend(state, state["pool"], compiled.CompiledPagedAttention, ops=ops)
        step.num_splits = 2  # 2 splits: split + reduce kernels
        per_layer = 3
    else:
        forward = compiled.compile_step_forward(backend_fn)
        state = mixed_step(11, [9, 1, 5], [6, 20, 0], 7)
        step = compiled.CompiledPagedAttention(state["pool"], None, state["slots"], state["tables"], state["lens"],
                                               state["starts"], max_query_len=40, max_seq_len=64, ops=ops)  # fmt: skip
        per_layer = 2
    step.kernels = None  # the ops launch the kernels
    driver = triton.runtime.driver
    saved = driver._active
    driver.set_active(StandInDriver())
    try:
        with (torch.inference_mode(), torch._dynamo.config.patch(compiled.compile_settings()),
              pytest.raises(BaseException, match="inspected, never run")):  # fmt: skip
            forward(model, state["tokens"], state["positions"], step)
    finally:
        driver._active = saved
    (gm,) = graphs
    kernels = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(kernels) == per_layer * CONFIG.num_hidden_layers
    stores = [n for n in kernels if "kv_ptr" in n.kwargs["kwargs"]]  # QK-norm + RoPE + store: its q out and the pool
    assert [n.kwargs["tensors_to_clone"] for n in stores] == [["q_out_ptr", "kv_ptr"]] * CONFIG.num_hidden_layers
    assert all(any(isinstance(x, torch.fx.Node) for x in n.kwargs["grid"][0]) for n in kernels)  # S or N: an input
    if kind == "step":  # the varlen kernel: grid (N // BLOCK_Q + S, nkv), S passed as a symbolic argument too
        varlen = [n for n in kernels if n not in stores]
        assert all(isinstance(n.kwargs["kwargs"]["num_seqs"], torch.fx.Node) for n in varlen)
    for reinplace in (lambda: reinplace_inplaceable_ops(FakeTensorUpdater(gm), gm.graph),  # torch 2.13
                      lambda: reinplace_inplaceable_ops(FakeTensorUpdater(gm.graph), gm.graph),
                      lambda: reinplace_inplaceable_ops(gm.graph)):  # fmt: skip
        try:  # the pass's signature moves between torch versions; a wrong one fails before touching the graph
            reinplace()
            break
        except (TypeError, AttributeError):
            continue
    else:
        pytest.fail("no known signature of inductor's reinplace_inplaceable_ops fits this torch")
    assert [n.kwargs["tensors_to_clone"] for n in kernels] == [[]] * len(kernels)
    copies = [n for n in gm.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert len(copies) == 1 and copies[0].args[0] is copies[0].args[1]  # the pool, onto itself


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (the GEMV modules import it)")
@pytest.mark.parametrize("batch_range, takes_gemv", [((2, 8), True), ((16, 32), False), (None, False)])
def test_the_small_buckets_range_lets_the_gemv_projections_in(model, batch_range, takes_gemv):
    """The small decode buckets compile with the batch known to lie in 2..8, so the GEMV projections (use_gemv:
    at most 16 rows) are traced into the graph, the same kernels the eager graphs ran; with the large buckets'
    range, or none, the batch may exceed 16 and they take F.linear. Traced only (the graph is inspected)."""
    import copy

    from qwen3.kernels.gemv_linear import use_gemv

    gemv_model = copy.deepcopy(model)
    use_gemv(gemv_model, allow_cpu=True, lm_head=False)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return lambda *args: pytest.fail("the captured graph is inspected, never run")

    torch._dynamo.reset()
    forward = compiled.compile_decode_forward(keep)
    num_seqs = 5 if batch_range is None else batch_range[0] + 1
    state = decode_state(num_seqs, 12, num_blocks=8 * num_seqs)
    step = backend(state, state["pool"], compiled.CompiledPagedAttention, ops=compiled.REFERENCE_OPS)
    with (torch.inference_mode(), torch._dynamo.config.patch(compiled.compile_settings()),
          pytest.raises(BaseException, match="inspected, never run")):  # fmt: skip
        forward(gemv_model, state["tokens"], state["positions"], step, batch_range=batch_range)
    (gm,) = graphs
    gemvs = [n for n in gm.graph.nodes if n.target is torch.ops.qwen3.gemv.default]
    assert len(gemvs) == (4 * CONFIG.num_hidden_layers if takes_gemv else 0)  # qkv, o, gate_up, down (fused)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or INTERPRETED, reason="needs triton; the parent")
def test_store_kv_pool_kernel_interpreted():
    """The pool-wide store kernel (the compiled path's store) under Triton's interpreter (CPU, a subprocess)."""
    run_in_triton_interpreter(f"{__file__}::test_store_kv_pool_kernel_equals_the_reference", passed=1, timeout=300)


@pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess of the test above")
def test_store_kv_pool_kernel_equals_the_reference():
    from qwen3.engine import triton_kernels
    from qwen3.engine.attention import store_kv

    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        kv = torch.randn(2, 3, 6, BLOCK, 2, 16, generator=gen).to(dtype)
        want = kv.clone()
        k, v = torch.randn(2, 5, 2, 16, generator=gen).to(dtype).unbind(0)  # the model's dtype, as in the engine
        slots = torch.tensor([7, -1, 0, 23, 12], dtype=torch.int32)  # -1: a padding row, written nowhere
        triton_kernels.store_kv_pool(k, v, kv, 2, slots)
        store_kv(k, v, want[0, 2], want[1, 2], slots)
        assert torch.equal(kv, want)
