"""The engine (qwen3.engine) against the plain path: every request's greedy output equals qwen3.generate on that
prompt alone (fp32, CPU), whatever the batch around it, the chunking, the pool size (preemption) or the prefix
cache; the paged reference attention equals the dense formula; sampling per row matches qwen3.sampling; blocks
all come back. Small random models from conftest.make_reference."""

from __future__ import annotations

import importlib.util
import math
import os
from types import SimpleNamespace

import pytest
import torch

import qwen3
from conftest import fix_triton_interpreter_scalars, make_reference, record_stand_in_graphs, run_in_triton_interpreter
from qwen3.engine import LLM
from qwen3.engine.attention import (
    REFERENCE,
    KVPool,
    PagedAttention,
    paged_attention,
    paged_decode_attention,
    store_kv,
    triton_ops,
)
from qwen3.engine.block_manager import BlockManager
from qwen3.engine.sampler import filter_candidates, seeded_exponential
from qwen3.engine.sequence import Sequence
from qwen3.model import KVCache
from qwen3.sampling import SamplingParams, filter_logits

VOCAB = 320
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine-small")
    make_reference(directory, seed=7)
    return qwen3.load_model(directory)


def engine(model, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_tokens", 4096)
    kwargs.setdefault("block_size", 8)
    return LLM(model, **kwargs)


def random_prompts(lengths, seed=0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def reference(model, prompt: list[int], max_tokens: int, sampling: SamplingParams | None = None) -> list[int]:
    return qwen3.generate(model, [prompt], max_tokens, sampling=sampling)[0].tolist()


def check_outputs(llm, model, prompts, params) -> list:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    params = params if isinstance(params, list) else [params] * len(prompts)
    for prompt, p, out in zip(prompts, params, outputs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == reference(model, prompt, p.max_tokens), f"prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"
    llm.block_manager.check_all_free()
    return outputs


# ---------------------------------------------------------------------------------------------------
# Attention: the paged reference against the dense formula


def dense64(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v in float64, GQA by repeating KV heads: q (nh, T, D), k, v (nkv, S, D)."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(groups, 0), v.double().repeat_interleave(groups, 0)
    scores = (q.double() @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, -math.inf).softmax(-1) @ v


def test_reference_paged_attention_equals_dense_formula():
    """Random sequences, random block placement, mixed query lengths (decode, chunk, whole prompt) -> the dense
    textbook attention in float64 over each sequence's keys with the causal mask at its positions."""
    gen = torch.Generator().manual_seed(0)
    nh, nkv, D, bs, num_blocks = 4, 2, 16, 4, 40
    seq_lens, query_lens = [1, 7, 8, 9, 23, 5], [1, 3, 8, 1, 23, 2]
    k_cache = torch.full((num_blocks, bs, nkv, D), math.nan, dtype=torch.float64)  # unwritten slots must not leak
    v_cache = torch.full_like(k_cache, math.nan)
    blocks = torch.randperm(num_blocks, generator=gen).tolist()
    tables, dense_k, dense_v = [], [], []
    for L in seq_lens:
        n = -(-L // bs)
        tables.append(blocks[:n] + [0] * (8 - n))
        blocks = blocks[n:]
        dense_k.append(torch.randn(L, nkv, D, generator=gen, dtype=torch.float64))
        dense_v.append(torch.randn(L, nkv, D, generator=gen, dtype=torch.float64))
    block_tables = torch.tensor(tables, dtype=torch.int32)
    # store every key through store_kv, one packed call (a padding slot -1 in the middle must be skipped)
    slots = [tables[s][t // bs] * bs + t % bs for s, L in enumerate(seq_lens) for t in range(L)]
    k_all, v_all = torch.cat(dense_k), torch.cat(dense_v)
    store_kv(torch.cat([k_all, k_all[:1] + 100]), torch.cat([v_all, v_all[:1] + 100]), k_cache, v_cache,
             torch.tensor(slots + [-1], dtype=torch.int32))  # fmt: skip
    q = torch.randn(sum(query_lens), nh, D, generator=gen, dtype=torch.float64)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = paged_attention(q, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32), starts,
                          D**-0.5, max(query_lens), max(seq_lens))  # fmt: skip
    for s, (L, ql) in enumerate(zip(seq_lens, query_lens, strict=True)):
        qs = q[starts[s] : starts[s + 1]].transpose(0, 1)  # (nh, ql, D)
        positions = torch.arange(L - ql, L)
        mask = torch.arange(L)[None, :] <= positions[:, None]  # (ql, L)
        expected = dense64(qs, dense_k[s].transpose(0, 1), dense_v[s].transpose(0, 1), mask)
        torch.testing.assert_close(out[starts[s] : starts[s + 1]], expected.transpose(0, 1), rtol=1e-10, atol=1e-10)
    # decode: the last position of every sequence
    q1 = torch.randn(len(seq_lens), nh, D, generator=gen, dtype=torch.float64)
    got = paged_decode_attention(q1, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32),
                                 D**-0.5, num_splits=4)  # fmt: skip
    ones = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    want = paged_attention(q1, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32), ones,
                           D**-0.5, 1, max(seq_lens))  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    expected = dense64(q1[-1][:, None], dense_k[-1].transpose(0, 1), dense_v[-1].transpose(0, 1),
                       torch.ones(1, seq_lens[-1], dtype=torch.bool))  # fmt: skip
    torch.testing.assert_close(got[-1], expected[:, 0], rtol=1e-10, atol=1e-10)


def test_paged_backend_in_the_model_equals_the_kv_cache(model):
    """The model's forward through PagedAttention (prompt in two chunks at scattered blocks) gives the logits of
    the dense KVCache backend."""
    prompt = random_prompts([21], seed=3)[0]
    bs, cfg = 4, model.config
    pool = KVPool(cfg.num_hidden_layers, 16, bs, model.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    table = [9, 2, 14, 5, 0, 11]
    logits = []
    for start, end in ((0, 13), (13, 21)):
        slots = torch.tensor([table[t // bs] * bs + t % bs for t in range(start, end)], dtype=torch.int32)
        backend = PagedAttention(
            pool, REFERENCE, slots, torch.tensor([table], dtype=torch.int32), torch.tensor([end], dtype=torch.int32),
            torch.tensor([0, end - start], dtype=torch.int32), end - start, end,
        )  # fmt: skip
        ids = torch.tensor([prompt[start:end]])
        logits.append(model(ids, torch.arange(start, end)[None], backend))
    cache = KVCache.for_model(model, 1, 32)
    with torch.no_grad():
        expected = model(torch.tensor([prompt]), torch.arange(21)[None], cache)
    torch.testing.assert_close(torch.cat(logits, 1), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Greedy outputs equal qwen3.generate on each prompt alone


def test_prompt_lengths_around_block_boundaries_and_mixed_max_tokens(model):
    lengths = [1, 2, 7, 8, 9, 15, 16, 17, 23, 24, 25, 40]
    prompts = random_prompts(lengths)
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=m) for m in (1, 9, 3, 8, 16, 2, 7, 12,
                                                                                        5, 17, 4, 10)]  # fmt: skip
    llm = engine(model)
    check_outputs(llm, model, prompts, params)
    check_outputs(llm, model, prompts[::-1], params[::-1])  # reversed order (and a warm prefix cache)


@pytest.mark.parametrize("budget", [1, 7, 4096])
def test_chunked_prefill_mixed_with_decodes(model, budget):
    prompts = random_prompts([30, 5, 17, 12], seed=1)
    llm = engine(model, max_num_batched_tokens=budget)
    check_outputs(llm, model, prompts, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6))


def test_decode_steps_are_packed_longest_context_first(model, monkeypatch):
    """A step of decodes only lists its sequences longest context first (a step with a prompt chunk keeps decodes
    first, in arrival order); the outputs stay those of each prompt alone."""
    llm = engine(model)
    packed = []  # per step: (contexts in packing order, decodes only)
    schedule = llm.scheduler.schedule

    def spy():
        batch = schedule()
        packed.append(([seq.num_computed_tokens for seq in batch.seqs], batch.is_decode))
        return batch

    monkeypatch.setattr(llm.scheduler, "schedule", spy)
    prompts = random_prompts([5, 30, 12, 21], seed=40)  # arrival order is not length order
    check_outputs(llm, model, prompts, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6))
    decodes = [contexts for contexts, is_decode in packed if is_decode and len(contexts) == len(prompts)]
    assert decodes and all(contexts == sorted(contexts, reverse=True) for contexts in decodes)


def test_pool_too_small_preempts_and_recomputes(model):
    prompts = random_prompts([20, 14, 25, 9, 18, 11], seed=2)
    llm = engine(model, kv_cache_tokens=48, block_size=4)  # 12 blocks; the six need ~45 blocks together
    check_outputs(llm, model, prompts, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12))
    assert llm.scheduler.num_preemptions > 0


def test_max_num_seqs_limits_the_running_set(model):
    prompts = random_prompts([5, 9, 13, 3, 8], seed=4)
    llm = engine(model, max_num_seqs=2)
    check_outputs(llm, model, prompts, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=5))


def test_num_running_counts_a_request_until_its_last_token_is_read_back(model):
    """A request that reaches max_tokens leaves the scheduler when its last token is sampled, and finishes when the
    token is read back, a step later: num_running (the stats' count) holds it until then."""
    llm = engine(model)
    seq = llm.make_sequence(0, random_prompts([5], seed=33)[0], SamplingParams(temperature=0.0, max_tokens=2), "0",
                            stream=False)  # fmt: skip
    llm.add(seq)
    counts = []
    while llm.has_work():
        llm.step()
        counts.append((len(llm.scheduler.running), llm.num_running, seq.finished))
    assert counts == [(1, 1, False), (0, 1, False), (0, 0, True)]


def test_prefix_cache_hit_on_a_resent_prefix(model):
    shared = random_prompts([37], seed=5)[0]
    first = [shared + tail for tail in random_prompts([3, 6], seed=6)]
    llm = engine(model)
    outs = check_outputs(llm, model, first, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=7))
    assert all(o.num_cached_tokens == 0 for o in outs[:1])
    again = [shared + tail for tail in random_prompts([2, 9], seed=8)] + [first[0]]
    outs = check_outputs(llm, model, again, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=7))
    assert [o.num_cached_tokens for o in outs] == [32, 32, 32]  # 4 full blocks of 8 of the shared 37 tokens
    # a whole prompt that is cached still recomputes its last token
    exact = first[0][:32]
    llm.generate([exact], GREEDY, use_tqdm=False)
    out = check_outputs(llm, model, [exact], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=3))[0]
    assert out.num_cached_tokens == 24


def test_prefix_caching_off(model):
    prompt = random_prompts([30], seed=9)[0]
    llm = engine(model, enable_prefix_caching=False)
    for _ in range(2):
        out = check_outputs(llm, model, [prompt], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4))[0]
        assert out.num_cached_tokens == 0


def test_block_manager_hash_collision_is_caught():
    """Two blocks with the same hash but different tokens: the token comparison refuses the hit."""
    bm = BlockManager(8, 4)
    seq = Sequence("a", [1, 2, 3, 4, 5, 6], SamplingParams(), 0)
    assert bm.allocate(seq, 6)
    seq.num_computed_tokens = 6
    bm.register_full_blocks(seq)
    bm.release(seq)
    block = bm.block_of_hash[seq_hash := next(iter(bm.block_of_hash))]
    bm.tokens_of[block] = (9, 9, 9, 9)  # as if another prefix had hashed to the same value
    other = Sequence("b", [1, 2, 3, 4, 5, 6], SamplingParams(), 1)
    assert bm.cached_prefix(other) == [] and seq_hash in bm.block_of_hash
    bm.check_all_free()


def test_penalties_match_the_plain_sampler(model):
    """Greedy with penalties: penalty counts kept per row on the device give qwen3.generate's tokens."""
    prompts = random_prompts([6, 11, 3], seed=10)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.8, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.7, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    ]
    llm = engine(model, kv_cache_tokens=64, block_size=4)  # small: preemption rebuilds the counts
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        assert out.token_ids == reference(model, prompt, 12, p)
    llm.block_manager.check_all_free()


# ---------------------------------------------------------------------------------------------------
# Sampling


def test_seeded_request_alone_and_in_a_crowd(model):
    seeded = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    prompt = random_prompts([13], seed=11)[0]
    llm = engine(model)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids
    crowd_prompts = random_prompts([4, 20, 9], seed=12)
    crowd_params = [SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True),
                    SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
                    SamplingParams(temperature=0.7, min_p=0.1, seed=5, max_tokens=3, ignore_eos=True)]  # fmt: skip
    prompts = crowd_prompts[:2] + [prompt] + crowd_prompts[2:]
    outs = llm.generate(prompts, crowd_params[:2] + [seeded] + crowd_params[2:], use_tqdm=False)
    assert outs[2].token_ids == alone
    other_seed = llm.generate([prompt], SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=99, max_tokens=10,
                                                      ignore_eos=True), use_tqdm=False)[0]  # fmt: skip
    assert other_seed.token_ids != alone
    llm.block_manager.check_all_free()


def test_seeded_draws_follow_the_distribution():
    """The counter-based noise gives an exact sampler: over many (seed, step) keys the frequencies match softmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]])
    probs = logits.softmax(-1)[0]
    keys = torch.arange(20000, dtype=torch.int64) * 7919 % (1 << 32)
    noise = seeded_exponential(keys, 6)  # (N, 6)
    picks = (probs[None] / noise).argmax(-1)
    freq = torch.bincount(picks, minlength=6).double() / len(keys)
    sigma = (probs.double() * (1 - probs.double()) / len(keys)).sqrt()
    assert ((freq - probs.double()).abs() < 5 * sigma).all(), (freq, probs)
    assert abs(noise.mean().item() - 1.0) < 0.02  # Exp(1)


def test_per_row_filters_match_filter_logits():
    """Each row's kept set under its own top-k/top-p/min-p equals qwen3.sampling.filter_logits on that row."""
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 300, generator=gen) * 3
    rows = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.8, 0.0), (20, 0.95, 0.0), (10, 0.9, 0.05), (0, 1.0, 0.2)]
    params = [SamplingParams(top_k=k, top_p=p, min_p=m) for k, p, m in rows]
    values, ids = filter_candidates(logits.clone(), params)  # rows without a top-k: the whole vocabulary
    assert values.shape == logits.shape
    filtered = torch.full_like(logits, -math.inf).scatter_(1, ids, values)  # back to vocabulary order
    for i, (k, p, m) in enumerate(rows):
        expected = filter_logits(logits[i : i + 1], k, p, m)[0]
        assert torch.equal(filtered[i].isfinite(), expected.isfinite()), i


def test_top_k_candidates_keep_what_filter_logits_keeps():
    """Rows with top-k: the candidates that survive are exactly the tokens qwen3.sampling.filter_logits keeps on
    that row, with the same values; a tie at the k-th value keeps every tied token, as filter_logits does."""
    gen = torch.Generator().manual_seed(17)
    logits = torch.randn(7, 3000, generator=gen) * 3
    logits[6, :40] = 30.0  # 40 tokens tied at the top: top-k 20 keeps all 40
    rows = [(20, 0.95, 0.0), (1, 1.0, 0.0), (50, 1.0, 0.0), (20, 0.5, 0.0), (300, 0.9, 0.05), (5, 1.0, 0.3),
            (20, 1.0, 0.0)]  # fmt: skip
    params = [SamplingParams(top_k=k, top_p=p, min_p=m) for k, p, m in rows]
    values, ids = filter_candidates(logits.clone(), params)
    assert values.shape == (7, 300 + 64)  # the largest k + TIE_MARGIN, not the vocabulary
    for i, (k, p, m) in enumerate(rows):
        expected = filter_logits(logits[i : i + 1], k, p, m)[0]
        kept = values[i].isfinite()
        assert sorted(ids[i][kept].tolist()) == expected.isfinite().nonzero()[:, 0].tolist(), i
        assert torch.equal(values[i][kept], logits[i][ids[i][kept]])
    assert values[6].isfinite().sum() == 40
    assert filter_candidates(logits, [SamplingParams(top_p=0.9)] * 7)[0].shape == (7, 3000)  # no top-k: all of V


def test_sampler_draws_the_same_tokens_from_the_candidates_as_from_the_whole_vocabulary(monkeypatch):
    """Seeded rows with Qwen3's defaults (top-k 20, top-p 0.95) and others: the candidate path and the
    full-vocabulary path (candidates turned off) draw the same token at every step."""
    import qwen3.engine.sampler as sampler_module

    V = 4000
    params = [SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=s) for s in range(6)]
    params += [SamplingParams(temperature=1.0, top_k=200, min_p=0.02, seed=9), SamplingParams(temperature=0.0)]
    draws = {}
    for candidates in (True, False):
        if not candidates:
            monkeypatch.setattr(qwen3.sampling, "TOP_K_CANDIDATES", 0)
        got = []
        for step in range(12):
            logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(100 + step)) * 4
            seqs = [Sequence(str(i), [1, 2], p, -1) for i, p in enumerate(params)]
            for seq in seqs:
                seq.token_ids += [3] * step  # the output index is part of a seeded row's key
            got.append(sampler_module.Sampler(8, V, torch.device("cpu"))(logits, seqs)[0].tolist())
        draws[candidates] = got
    assert draws[True] == draws[False]
    assert len({tuple(step[:6]) for step in draws[True]}) > 1  # the draws do vary


def test_logprobs(model):
    prompt = random_prompts([9], seed=14)[0]
    llm = engine(model)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, logprobs=4, ignore_eos=True),
                       use_tqdm=False)[0]  # fmt: skip
    assert len(out.logprobs) == 3
    with torch.no_grad():
        full = model(torch.tensor([prompt + out.token_ids]))[0].float().log_softmax(-1)
    for i, lp in enumerate(out.logprobs):
        row = full[len(prompt) - 1 + i]
        assert lp.token_id == out.token_ids[i] == lp.top[0][0]
        assert math.isclose(lp.logprob, row[lp.token_id].item(), abs_tol=1e-4)
        assert [t for t, _ in lp.top] == row.topk(4).indices.tolist()
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].logprobs is None


# ---------------------------------------------------------------------------------------------------
# Stops, text, errors, abort


def test_stop_token_ids_and_eos(model, tok):
    prompt = random_prompts([10], seed=15)[0]
    llm = engine(model, tokenizer=tok)
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0]  # fmt: skip
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]
    assert out.text == tok.decode(free.token_ids[:first])
    llm.config.eos_token_ids = (stop_id,)  # the same id as EOS: ends the text; ignore_eos runs past it
    assert llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0].token_ids == \
        free.token_ids[: first + 1]  # fmt: skip
    assert llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].token_ids == free.token_ids  # fmt: skip
    llm.block_manager.check_all_free()


def test_stop_strings(model, tok):
    prompt = random_prompts([10], seed=16)[0]
    llm = engine(model, tokenizer=tok)
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    assert free.text == tok.decode(free.token_ids) and free.finish_reason == "length"
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, stop=stop), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == free.text[: free.text.find(stop)]
    assert free.token_ids[: len(out.token_ids)] == out.token_ids
    llm.block_manager.check_all_free()


def test_max_num_seqs_beyond_the_decode_kernels_limit_is_refused(model, monkeypatch):
    """The Triton decode kernel takes at most max_decode_seqs sequences per launch (its grid's second dimension):
    a larger max_num_seqs is refused when the engine is built, not in the middle of serving."""
    import qwen3.engine.llm as llm_module
    from qwen3.engine.attention import REFERENCE

    limited = SimpleNamespace(**vars(REFERENCE), max_decode_seqs=4)
    monkeypatch.setattr(llm_module, "kernels_for", lambda device: limited)
    with pytest.raises(ValueError, match="max_num_seqs=5 exceeds the 4 sequences the Triton decode kernel takes"):
        engine(model, max_num_seqs=5)
    assert engine(model, max_num_seqs=4).generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)


def test_invalid_requests_fail_before_anything_runs(model, tok):
    llm = engine(model, max_model_len=64)
    good = random_prompts([5], seed=17)[0]
    cases = [
        ([good, []], GREEDY, "request 1: the prompt is empty"),
        ([good, [1] * 64], GREEDY, "request 1: the prompt has 64 tokens"),
        ([good, good + [VOCAB]], GREEDY, "request 1: token id 320 is outside"),
        ([good, "text"], GREEDY, "request 1: a text prompt needs a tokenizer"),
        ([good, [1, 2.5]], GREEDY, "request 1: token ids must be integers"),
        ([good, 7], GREEDY, "request 1: a prompt is a string or a list of token ids"),
        ([good, good], [GREEDY], "sampling_params: 1 given for 2 prompts"),
        ([good, good], [GREEDY, SamplingParams(stop="x")], "request 1: stop strings need a tokenizer"),
        ([good, good], [GREEDY, {"temperature": 0}], "request 1: sampling_params must be a SamplingParams"),
    ]
    for prompts, params, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, params, use_tqdm=False)
        assert not llm.scheduler.has_work()
        llm.block_manager.check_all_free()
    with pytest.raises(ValueError, match="max_model_len"):
        engine(model, max_model_len=10_000)
    with pytest.raises(ValueError, match="SamplingParams.max_tokens=0"):
        SamplingParams(max_tokens=0)
    # the engine keeps serving; numpy and tensor prompts are token ids too
    check_outputs(llm, model, [good], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=3))
    import numpy as np

    outs = llm.generate([np.array(good), torch.tensor(good)], SamplingParams(temperature=0.0, max_tokens=3),
                        use_tqdm=False)  # fmt: skip
    assert outs[0].token_ids == outs[1].token_ids == reference(model, good, 3)


def test_length_stops_at_max_model_len(model):
    llm = engine(model, max_model_len=20)
    prompt = random_prompts([15], seed=18)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert out.token_ids == reference(model, prompt, 5)


def test_abort_frees_blocks(model):
    llm = engine(model)
    seqs = [llm.make_sequence(i, p, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True), str(i), False)
            for i, p in enumerate(random_prompts([30, 12, 20], seed=19))]  # fmt: skip
    for seq in seqs:
        llm.add(seq)
    for _ in range(3):
        llm.step()
    assert llm.block_manager.usage() > 0
    llm.abort(seqs[1])
    assert not seqs[1].block_table and seqs[1].finish_reason == "abort"
    assert min(seqs[1].token_ids) >= 0  # a token still in flight was dropped, not left as a placeholder
    for seq in (seqs[0], seqs[2]):
        llm.abort(seq)
    llm.block_manager.check_all_free()
    assert not llm.scheduler.has_work()




def test_graph_bookkeeping_on_cpu(model, monkeypatch):
    """The CUDA-graph path's static buffers, bucket choice, padding rows and LM head after the replay, run on the
    CPU: a stand-in 'graph' re-runs the recorded forward on replay (the reference kernels rebuild their gather
    plan each time, where a real graph's Triton kernels read seq_lens on the device)."""
    record_stand_in_graphs(monkeypatch)
    prompts = random_prompts([3, 9, 17, 30, 5, 12, 1, 25, 8, 2, 19], seed=22)
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=3 + 2 * (i % 5)) for i in range(len(prompts))]
    llm = engine(model, max_num_seqs=16)
    llm.runner.capture_graphs()
    assert list(llm.runner.graphs) == [1, 2, 4, 8, 16]
    replays = []
    replay = llm.runner._replay
    llm.runner._replay = lambda bucket, *args: replays.append(bucket) or replay(bucket, *args)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert {16, 8, 4}.issubset(replays)  # 11 sequences pad to 16, then the batch shrinks
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        assert out.token_ids == reference(model, prompt, p.max_tokens)
    llm.block_manager.check_all_free()


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETED or importlib.util.find_spec("triton") is None,
                    reason="CUDA runs the compiled kernels (below); without triton nothing to run")  # fmt: skip
def test_triton_kernels_in_the_engine_interpreted():
    """The engine on the Triton kernels, run by Triton's interpreter on the CPU (a subprocess: TRITON_INTERPRET
    must be set before triton is imported): strides, dtypes and padding as the engine really passes them."""
    run_in_triton_interpreter(f"{__file__}::test_engine_runs_the_triton_kernels", passed=1)


@pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess of the test above")
def test_engine_runs_the_triton_kernels(model, monkeypatch):
    fix_triton_interpreter_scalars()  # Triton 3.6's interpreter vs NumPy 2 (this runs in its own subprocess)
    prompts = random_prompts([3, 17, 26], seed=23)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (4, 2, 5)]
    want = [reference(model, prompt, p.max_tokens) for prompt, p in zip(prompts, params, strict=True)]
    mixed = engine(model, max_num_batched_tokens=24, max_num_seqs=4)  # chunks mixed with decodes, prefix hits
    mixed.runner.kernels = triton_ops()
    for _ in range(2):
        assert [o.token_ids for o in mixed.generate(prompts, params, use_tqdm=False)] == want
    record_stand_in_graphs(monkeypatch)
    graphs = engine(model, max_num_seqs=4)
    graphs.runner.kernels = triton_ops()
    graphs.runner.capture_graphs()  # the decode kernel, with padding rows, through the graph bookkeeping
    assert [o.token_ids for o in graphs.generate(prompts, params, use_tqdm=False)] == want
    mixed.block_manager.check_all_free()
    graphs.block_manager.check_all_free()


# ---------------------------------------------------------------------------------------------------
# CUDA: graphs and the Triton kernels against the eager reference (skipped without a GPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cuda_model(model):
    import copy

    return copy.deepcopy(model).cuda() if torch.cuda.is_available() else None


@needs_cuda
def test_cuda_graph_replay_equals_eager_and_generate(cuda_model):
    prompts = random_prompts([3, 9, 17, 30, 5, 12, 1, 25] * 3, seed=20)
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4 + 3 * (i % 7)) for i in range(len(prompts))]
    eager = engine(cuda_model, enforce_eager=True, max_num_seqs=32)
    graphs = engine(cuda_model, max_num_seqs=32)
    assert sorted(graphs.runner.graphs) == [1, 2, 4, 8, 16, 32] and not eager.runner.graphs
    replays = []
    replay = graphs.runner._replay
    graphs.runner._replay = lambda bucket, *args: replays.append(bucket) or replay(bucket, *args)
    want = eager.generate(prompts, params, use_tqdm=False)
    got = graphs.generate(prompts, params, use_tqdm=False)
    assert len(set(replays)) >= 3  # the decode batch shrank through several buckets
    for prompt, p, a, b in zip(prompts, params, want, got, strict=True):
        assert a.token_ids == b.token_ids == reference(cuda_model, prompt, p.max_tokens)
    graphs.block_manager.check_all_free()


@needs_cuda
def test_triton_kernels_equal_the_reference_path_in_the_engine(cuda_model):
    prompts = random_prompts([40, 7, 16, 33], seed=21)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=9)
    triton = engine(cuda_model, enforce_eager=True, max_num_batched_tokens=24)  # chunked prefill + decode mixed
    assert triton.kernels.name == "triton"
    plain = engine(cuda_model, enforce_eager=True, max_num_batched_tokens=24)
    plain.runner.kernels = REFERENCE
    a = triton.generate(prompts, params, use_tqdm=False)
    b = plain.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    again = triton.generate(prompts, params, use_tqdm=False)  # prefix-cache hits through the Triton prefill
    assert [o.token_ids for o in again] == [o.token_ids for o in a] and again[0].num_cached_tokens > 0


@needs_cuda
def test_pool_sized_from_gpu_memory(cuda_model):
    llm = LLM(cuda_model, gpu_memory_utilization=0.2, max_num_seqs=16)
    total = torch.cuda.mem_get_info()[1]
    assert 0 < llm.pool.kv.numel() * llm.pool.kv.element_size() < 0.2 * total
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out[0].token_ids) == 5


def test_llm_from_a_checkpoint_directory(fake_snapshot, tok):
    """A directory source: weights, tokenizer and EOS ids from its files; text prompts in, text out."""
    llm = LLM(fake_snapshot, max_num_seqs=4, kv_cache_tokens=1024)
    assert llm.tokenizer is not None and llm.config.eos_token_ids == tuple(tok.eos_token_ids)
    assert llm.device.type == "cpu" and llm.dtype == torch.float32 and llm.max_model_len == 1024
    outs = llm.generate(["Hello there", "A second prompt"], SamplingParams(temperature=0.0, max_tokens=6),
                        use_tqdm=False)  # fmt: skip
    for prompt, out in zip(["Hello there", "A second prompt"], outs, strict=True):
        assert out.prompt == prompt and out.prompt_token_ids == tok.encode(prompt, allow_special=True)
        ids = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
        assert out.text == tok.decode(ids)
        assert out.token_ids == reference(llm.model, out.prompt_token_ids, 6)[: len(out.token_ids)]
    llm.block_manager.check_all_free()


# ---------------------------------------------------------------------------------------------------
# fp8 key/value cache


class Fp8RoundedAttention:
    """No cache: each layer's keys and values rounded through float8_e4m3fn, then the model's dense formula.
    What an fp8 pool must compute, built without the engine."""

    def attend(self, layer, q, k, v, positions, math, qk):
        q, k = qk(q, k, positions)
        rounded = [x.to(torch.float8_e4m3fn).to(q.dtype) for x in (k, v)]
        return math(q, *rounded, None)


def fp8_pool_logits(model, prompt, kernels, device):
    """Logits of `prompt` through PagedAttention on a float8_e4m3fn pool: two prompt chunks (the second reads the
    first's keys back from fp8), then the last token as a decode step (split over the context)."""
    bs, cfg = 4, model.config
    pool = KVPool(cfg.num_hidden_layers, 16, bs, model.num_kv_heads, cfg.head_dim, torch.float8_e4m3fn, device)
    table = torch.tensor([[9, 2, 14, 5, 0, 11]], dtype=torch.int32, device=device)
    logits = []
    n = len(prompt)
    for start, end in ((0, 13), (13, n - 1), (n - 1, n)):
        slots = torch.tensor([table[0, t // bs] * bs + t % bs for t in range(start, end)], dtype=torch.int32,
                             device=device)  # fmt: skip
        backend = PagedAttention(
            pool, kernels, slots, table, torch.tensor([end], dtype=torch.int32, device=device),
            torch.tensor([0, end - start], dtype=torch.int32, device=device), end - start, end,
            decode=end - start == 1, num_splits=2,
        )  # fmt: skip
        ids = torch.tensor([prompt[start:end]], device=device)
        with torch.no_grad():
            logits.append(model(ids, torch.arange(start, end, device=device)[None], backend))
    return torch.cat(logits, 1)


def test_fp8_pool_gives_the_logits_of_attention_over_fp8_rounded_keys_and_values(model):
    """The reference kernels on an fp8 pool equal the dense formula over keys/values rounded through fp8, and
    differ from the unrounded model by far more than that agreement."""
    prompt = random_prompts([21], seed=4)[0]
    got = fp8_pool_logits(model, prompt, REFERENCE, "cpu")
    with torch.no_grad():
        rounded = model(torch.tensor([prompt]), cache=Fp8RoundedAttention())
        plain = model(torch.tensor([prompt]))
    torch.testing.assert_close(got, rounded, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 100 * (got - rounded).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernels on an fp8 pool)")
def test_fp8_pool_triton_kernels_equal_the_reference_kernels(model):
    import copy

    gpu = copy.deepcopy(model).cuda()
    prompt = random_prompts([21], seed=5)[0]
    got = fp8_pool_logits(gpu, prompt, triton_ops(), "cuda")
    want = fp8_pool_logits(gpu, prompt, REFERENCE, "cuda")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fp8_kv_cache_engine_equals_greedy_decoding_over_fp8_rounded_attention(model):
    llm = engine(model, kv_cache_dtype="fp8", max_num_batched_tokens=24)  # chunked prompts read the fp8 prefix
    assert llm.pool.kv.dtype == torch.float8_e4m3fn
    prompts = random_prompts([5, 17, 30])
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]), cache=Fp8RoundedAttention())[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt):]
    llm.block_manager.check_all_free()


def test_fp8_kv_cache_stores_one_byte_per_value_and_bad_names_are_refused(model):
    auto, fp8 = engine(model, kv_cache_tokens=None), engine(model, kv_cache_tokens=None, kv_cache_dtype="fp8")
    assert auto.pool.kv.element_size() == 4 and fp8.pool.kv.element_size() == 1
    with pytest.raises(ValueError, match="kv_cache_dtype='int4' must be one of auto, fp8"):
        engine(model, kv_cache_dtype="int4")


def test_fp8_kv_cache_with_compile_or_tensor_parallelism_is_a_clear_error(model):
    for kwargs in ({"compile": True}, {"tensor_parallel_size": 2}):
        with pytest.raises(ValueError, match="not supported with tensor parallelism or compile=True"):
            LLM(model, kv_cache_dtype="fp8", **kwargs)


def test_gemv_needs_cuda_and_a_bool(model):
    with pytest.raises(ValueError, match="gemv=True needs CUDA and the Triton kernels"):
        LLM(model, gemv=True, kv_cache_tokens=256)
    with pytest.raises(ValueError, match="gemv='yes' must be None"):
        LLM(model, gemv="yes", kv_cache_tokens=256)
    llm = LLM(model, kv_cache_tokens=256)  # the CPU: the default swaps nothing
    assert all(type(m).__name__ != "GemvLinear" for m in llm.model.modules())
