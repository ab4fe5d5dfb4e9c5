"""Sampling against independent references: transformers' logits processors and float64 NumPy.

Logits are random (seeded) so every case is reproducible; the kept sets are recomputed from
scratch in float64 (sort, cumulative sum), and the sampler's output distribution is checked
against softmax(logits / T) restricted to that set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen3.sampling import (
    SamplingParams,
    apply_penalties,
    filter_logits,
    filter_top_k_candidates,
    make_generator,
    sample,
    update_counts,
)

ASSETS = Path(__file__).parent / "assets" / "qwen3-0.6b"

SHAPES = [(1, 7), (4, 50), (3, 1000), (2, 32000)]
FILTERS = [  # (top_k, top_p, min_p)
    (0, 1.0, 0.0),
    (1, 1.0, 0.0),
    (5, 1.0, 0.0),
    (0, 0.9, 0.0),
    (0, 0.3, 0.0),
    (0, 1.0, 0.1),
    (20, 0.95, 0.0),  # Qwen3's recommended setting
    (10, 0.8, 0.05),
    (100_000, 0.5, 0.2),  # top_k larger than the vocabulary
    (0, 0.01, 0.0),
    (3, 1.0, 1.0),
]
# A float64 decision this close to its threshold may legitimately go the other way in float32.
AMBIGUOUS = 1e-5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_logits(shape: tuple[int, int], seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale


def softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def reference_kept(row: np.ndarray, top_k: int, top_p: float, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Kept-token mask of one row in float64, and the tokens whose decision sits within AMBIGUOUS
    of its cut (float32 rounding, e.g. in a long cumulative sum, may legitimately flip those)."""
    x = row.astype(np.float64)
    vocab = x.size
    keep = np.ones(vocab, dtype=bool)
    ambiguous = np.zeros(vocab, dtype=bool)
    if 0 < top_k < vocab:
        kth = np.sort(x)[::-1][top_k - 1]
        keep &= x >= kth  # ties with the k-th largest are all kept
    if top_p < 1.0:
        probs = softmax64(np.where(keep, x, -np.inf))
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]  # mass of the strictly more likely tokens
        nucleus = np.zeros(vocab, dtype=bool)
        nucleus[order] = mass_before < top_p  # smallest prefix reaching top_p; always the first
        ambiguous[order] |= (probs[order] > 0) & (np.abs(mass_before - top_p) < AMBIGUOUS)
        keep &= nucleus
    if min_p > 0.0:
        probs = softmax64(np.where(keep, x, -np.inf))
        cut = min_p * probs.max()
        ambiguous |= keep & (probs < probs.max()) & (np.abs(probs - cut) < AMBIGUOUS * probs.max())
        keep &= probs >= cut
    return keep, ambiguous


def transformers_filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """transformers' warpers in GenerationMixin's order, skipping disabled ones as it does."""
    warpers = []
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p=min_p))
    dummy_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    for warper in warpers:
        logits = warper(dummy_ids, logits)
    return logits


# --- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("top_k,top_p,min_p", FILTERS)
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_filter_matches_transformers(shape, top_k, top_p, min_p, scale):
    logits = random_logits(shape, seed=shape[1] + int(10 * scale), scale=scale)
    ours = filter_logits(logits, top_k, top_p, min_p)
    theirs = transformers_filter(logits.clone(), top_k, top_p, min_p)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs)  # same -inf positions, kept logits untouched


@pytest.mark.parametrize("top_k,top_p,min_p", FILTERS)
def test_filter_matches_transformers_with_ties(top_k, top_p, min_p):
    # Integer logits in a small range tie a lot, including at the top-k boundary.
    gen = torch.Generator().manual_seed(7)
    logits = torch.randint(-3, 4, (8, 40), generator=gen).float()
    ours = filter_logits(logits, top_k, top_p, min_p)
    assert torch.equal(ours, transformers_filter(logits.clone(), top_k, top_p, min_p))
    if 0 < top_k < 40 and top_p == 1.0 and min_p == 0.0:
        kth = logits.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
        assert torch.equal(torch.isfinite(ours), logits >= kth)  # all ties at the cut kept


@pytest.mark.parametrize("top_p,n_kept", [(0.125, 1), (0.25, 2), (0.5, 4), (0.75, 6), (0.8, 7), (0.1, 1), (1e-9, 1)])
def test_top_p_stops_where_the_mass_reaches_top_p_exactly(top_p, n_kept):
    # Eight equal logits: each probability is exactly 1/8, so the cumulative masses are exact in
    # float32 and the nucleus (the smallest set with mass >= top_p) has a known size.
    logits = torch.zeros(3, 8)
    ours = filter_logits(logits, top_p=top_p)
    assert torch.isfinite(ours).sum(dim=-1).tolist() == [n_kept] * 3
    assert torch.equal(ours, transformers_filter(logits.clone(), 0, top_p, 0.0))
    for row in ours:
        assert reference_kept(logits[0].numpy(), 0, top_p, 0.0)[0].sum() == torch.isfinite(row).sum()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("top_k,top_p,min_p", FILTERS)
def test_filter_matches_float64_reference(shape, top_k, top_p, min_p):
    logits = random_logits(shape, seed=shape[1], scale=2.5)
    kept = torch.isfinite(filter_logits(logits, top_k, top_p, min_p)).numpy()
    for row, row_kept in zip(logits.numpy(), kept, strict=True):
        expected, ambiguous = reference_kept(row, top_k, top_p, min_p)
        assert ambiguous.sum() <= 2 + row.size // 1000  # the comparison below covers nearly every token
        np.testing.assert_array_equal(row_kept[~ambiguous], expected[~ambiguous])
        assert row_kept.sum() >= 1


def test_filter_computes_in_float32_for_any_dtype():
    logits = random_logits((3, 500), seed=1).to(torch.bfloat16)
    out = filter_logits(logits, 20, 0.9, 0.05)
    assert out.dtype == torch.float32
    assert torch.equal(out, filter_logits(logits.float(), 20, 0.9, 0.05))


def test_filter_does_not_modify_its_input():
    logits = random_logits((2, 100), seed=2)
    before = logits.clone()
    filter_logits(logits, 5, 0.5, 0.1)
    assert torch.equal(logits, before)


# --- penalties -------------------------------------------------------------------------------


def history(batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random prompt and output ids with repeats, their output counts (via update_counts) and prompt mask."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab // 2, (batch, 12), generator=gen)  # overlaps the output half-way
    output = torch.randint(vocab // 4, vocab, (batch, 15), generator=gen)
    counts = torch.zeros(batch, vocab, dtype=torch.int32)
    for step in range(output.shape[1]):
        update_counts(counts, output[:, step])
    prompt_mask = torch.zeros(batch, vocab, dtype=torch.bool).scatter_(1, prompt, True)
    return prompt, output, counts, prompt_mask


def test_update_counts_matches_bincount():
    _, output, counts, _ = history(3, 40, seed=0)
    for row, ids in zip(counts.numpy(), output.numpy(), strict=True):
        np.testing.assert_array_equal(row, np.bincount(ids, minlength=40))


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_transformers_over_prompt_and_output(penalty):
    logits = random_logits((3, 40), seed=3)
    prompt, output, counts, prompt_mask = history(3, 40, seed=4)
    ours = apply_penalties(logits, counts, SamplingParams(repetition_penalty=penalty), prompt_mask)
    processor = RepetitionPenaltyLogitsProcessor(penalty=penalty)
    theirs = processor(torch.cat([prompt, output], dim=1), logits.clone())
    assert torch.equal(ours, theirs)
    seen = prompt_mask | (counts > 0)
    assert seen.any() and (~seen).any()
    assert torch.equal(ours[~seen], logits[~seen])  # unseen tokens untouched


@pytest.mark.parametrize(
    "presence,frequency,repetition", [(0.5, 0.0, 1.0), (0.0, 0.3, 1.0), (-1.5, 2.0, 1.0), (1.0, -0.4, 1.2)]
)
def test_presence_frequency_penalties_match_float64_formula(presence, frequency, repetition):
    logits = random_logits((4, 60), seed=5)
    _, _, counts, prompt_mask = history(4, 60, seed=6)
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition)
    ours = apply_penalties(logits, counts, params, prompt_mask)

    x = logits.numpy().astype(np.float64)
    c = counts.numpy().astype(np.float64)
    seen = prompt_mask.numpy() | (c > 0)
    x = np.where(seen, np.where(x > 0, x / repetition, x * repetition), x)  # repetition first
    expected = x - frequency * c - presence * (c > 0)  # output tokens only
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-5)

    untouched = ~seen if repetition != 1.0 else counts == 0
    untouched = torch.as_tensor(untouched)
    assert untouched.any()
    assert torch.equal(ours[untouched], logits[untouched])  # bit-exact where nothing applies
    if repetition == 1.0:
        prompt_only = prompt_mask & (counts == 0)
        assert prompt_only.any()
        assert torch.equal(ours[prompt_only], logits[prompt_only])  # prompt tokens not penalised


def test_default_penalties_are_identity():
    logits = random_logits((2, 30), seed=8)
    _, _, counts, prompt_mask = history(2, 30, seed=9)
    assert torch.equal(apply_penalties(logits, counts, SamplingParams(), prompt_mask), logits)


# --- sampling --------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = random_logits((16, 1000), seed=10)
    for temperature in (0.0, 1e-6):
        params = SamplingParams(temperature=temperature, top_k=5, top_p=0.5, seed=0)
        assert params.greedy
        ids = sample(logits, params, make_generator(params, "cpu"))
        assert ids.dtype == torch.int64 and ids.shape == (16,)
        assert torch.equal(ids, logits.argmax(dim=-1))
    tied = torch.zeros(64, 10)  # greedy breaks exact ties towards the first index, sampling would not
    assert not sample(
        tied, SamplingParams(temperature=1e-6, seed=0), make_generator(SamplingParams(seed=0), "cpu")
    ).any()


def test_greedy_with_penalties_is_argmax_of_penalised_logits():
    logits = random_logits((4, 60), seed=11)
    _, _, counts, prompt_mask = history(4, 60, seed=12)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5)
    ids = sample(logits, params, token_counts=counts, prompt_mask=prompt_mask)
    assert torch.equal(ids, apply_penalties(logits, counts, params, prompt_mask).argmax(dim=-1))


def test_same_seed_same_tokens_different_seeds_differ():
    logits = random_logits((64, 1000), seed=13, scale=1.0)
    draws = {}
    for seed in (0, 0, 1):
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
        draws.setdefault(seed, []).append(sample(logits, params, make_generator(params, "cpu")))
    assert torch.equal(draws[0][0], draws[0][1])
    assert not torch.equal(draws[0][0], draws[1][0])


def test_make_generator_is_none_without_seed():
    assert make_generator(SamplingParams(), "cpu") is None
    assert isinstance(make_generator(SamplingParams(seed=3), "cpu"), torch.Generator)


@pytest.mark.parametrize("top_k,top_p,min_p", [f for f in FILTERS if 0 < f[0] < 3000] + [(20, 0.95, 0.0),
                                                                                      (40, 0.8, 0.05)])  # fmt: skip
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_candidates_keep_what_filter_logits_keeps(top_k, top_p, min_p, ties):
    """The candidates that survive are exactly filter_logits' kept tokens with the same values, ties at the k-th
    value included; so sample()'s draw among them is the same draw. (Where top-p cuts through tokens of equal
    value, which of them stay depends on the sort's order of equals, in transformers too: there only the count
    and the values are compared.)"""
    logits = random_logits((4, 3000), seed=top_k, scale=2.0)
    if ties:
        logits[:, 100:140] = logits.max() + 1  # 40 tokens tied at the top
    values, ids = filter_top_k_candidates(logits, top_k, top_k, top_p if top_p < 1 else None,
                                          min_p if min_p > 0 else None)  # fmt: skip
    expected = filter_logits(logits, top_k, top_p, min_p)
    for row in range(logits.shape[0]):
        kept = values[row].isfinite()
        want = expected[row].isfinite().nonzero()[:, 0]
        if ties and top_p < 1:
            assert sorted(values[row][kept].tolist()) == sorted(expected[row][want].tolist())
        else:
            assert sorted(ids[row][kept].tolist()) == want.tolist()
            assert torch.equal(values[row][kept], expected[row][ids[row][kept]])
    if ties:
        assert (values.isfinite().sum(-1) >= (40 if top_p == 1 and min_p == 0 else 1)).all()


def test_sample_takes_the_candidates_with_a_top_k(monkeypatch):
    import qwen3.sampling as sampling

    def refuse(*args, **kwargs):
        raise AssertionError("filter_logits sorts the whole vocabulary")

    monkeypatch.setattr(sampling, "filter_logits", refuse)
    logits = random_logits((3, 500), seed=3, scale=2.0)
    ids = sample(logits, SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=1))
    assert (logits.topk(20).indices == ids[:, None]).any(-1).all()
    with pytest.raises(AssertionError, match="sorts the whole vocabulary"):
        sample(logits, SamplingParams(temperature=0.6, top_p=0.95, seed=1))  # no top-k: the plain filters


@pytest.mark.parametrize("top_k,top_p,min_p", FILTERS)
def test_samples_lie_in_the_kept_set(top_k, top_p, min_p):
    logits = random_logits((8, 300), seed=14, scale=1.5)
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, min_p=min_p, seed=15)
    kept = torch.isfinite(filter_logits(logits / 0.7, top_k, top_p, min_p))
    repeated = logits.repeat(64, 1)  # 64 draws per row in one call
    ids = sample(repeated, params, make_generator(params, "cpu"))
    assert kept.repeat(64, 1).gather(1, ids[:, None]).all()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 8, 0.9, 0.0), (1.3, 0, 0.8, 0.05), (0.5, 10, 1.0, 0.1)],
)
@pytest.mark.parametrize("device", DEVICES)
def test_empirical_frequencies_match_restricted_softmax(temperature, top_k, top_p, min_p, device):
    # N i.i.d. draws: each empirical frequency f_i is a binomial mean with standard deviation
    # sigma_i = sqrt(p_i (1 - p_i) / N). Under a correct sampler z_i = (f_i - p_i) / sigma_i is ~N(0, 1),
    # and P(|z| > 5) ~ 6e-7, so over <= 12 tokens a false alarm has probability < 1e-5; with
    # N = 200_000 a bias of 5 sigma <= 5 * 0.5 / sqrt(N) ~ 0.006 in any p_i is caught.
    # Tokens outside the kept set must never be drawn at all.
    vocab, n = 12, 200_000
    logits = random_logits((1, vocab), seed=16, scale=1.5)
    x = logits[0].numpy().astype(np.float64)
    kept, ambiguous = reference_kept(x / temperature, top_k, top_p, min_p)
    assert not ambiguous.any() and kept.sum() > 1
    expected = softmax64(np.where(kept, x / temperature, -np.inf))

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=17)
    ids = sample(logits.to(device).expand(n, vocab), params, make_generator(params, device))
    counts = np.bincount(ids.cpu().numpy(), minlength=vocab)
    assert counts[~kept].sum() == 0
    freq = counts[kept] / n
    p = expected[kept]
    z = (freq - p) / np.sqrt(p * (1 - p) / n)
    assert np.abs(z).max() < 5, (freq, p, z)


def test_sample_accepts_low_precision_logits():
    logits = random_logits((4, 100), seed=18).to(torch.bfloat16)
    params = SamplingParams(temperature=0.9, top_k=10, seed=19)
    ids = sample(logits, params, make_generator(params, "cpu"))
    reference = sample(logits.float(), params, make_generator(params, "cpu"))
    assert torch.equal(ids, reference)


def test_no_host_synchronisation():
    # Meta tensors carry no data: .item(), nonzero() or branching on values would raise here.
    batch, vocab = 4, 100
    logits = torch.empty(batch, vocab, device="meta", dtype=torch.bfloat16)
    counts = torch.zeros(batch, vocab, device="meta", dtype=torch.int32)
    prompt_mask = torch.zeros(batch, vocab, device="meta", dtype=torch.bool)
    params = SamplingParams(
        temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, presence_penalty=0.5,
        frequency_penalty=0.5, repetition_penalty=1.1,
    )  # fmt: skip
    ids = sample(logits, params, token_counts=counts, prompt_mask=prompt_mask)
    assert ids.device.type == "meta" and ids.shape == (batch,) and ids.dtype == torch.int64
    update_counts(counts, ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_and_replay():
    device = torch.device("cuda")
    batch, vocab = 8, 1000
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.1, seed=0)
    logits = random_logits((batch, vocab), seed=20).to(device, torch.bfloat16)
    counts = torch.zeros(batch, vocab, device=device, dtype=torch.int32)
    generator = make_generator(params, device)

    def step() -> torch.Tensor:
        ids = sample(logits, params, generator, token_counts=counts)
        update_counts(counts, ids)
        return ids

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    counts.zero_()
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            ids = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    draws = []
    for _ in range(20):
        counts_before = counts.clone()
        graph.replay()
        penalised = apply_penalties(logits, counts_before, params)
        kept = torch.isfinite(filter_logits(penalised / 0.7, 50, 0.9, 0.02))
        assert kept.gather(1, ids[:, None]).all()
        draws.append(ids.clone())
    assert len({tuple(d.tolist()) for d in draws}) > 1  # the RNG advances between replays
    assert int(counts.sum()) == 20 * batch


# --- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("seed", -1),
        ("temperature", "hot"),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert repr(value) in str(info.value)


def test_boundary_values_are_valid():
    SamplingParams(temperature=0, top_k=0, top_p=1, min_p=0, presence_penalty=-2, frequency_penalty=2)
    SamplingParams(min_p=1.0, presence_penalty=2, frequency_penalty=-2, repetition_penalty=1e-3, seed=0)


def test_from_generation_config_qwen3():
    for source in (ASSETS / "generation_config.json", ASSETS, str(ASSETS)):
        params = SamplingParams.from_generation_config(source)
        assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
        assert (params.min_p, params.repetition_penalty) == (0.0, 1.0)
        assert not params.greedy


def test_from_generation_config_overrides_and_do_sample():
    params = SamplingParams.from_generation_config(ASSETS, top_k=None, temperature=0.0, seed=42, min_p=0.1)
    assert (params.temperature, params.top_k, params.top_p, params.min_p, params.seed) == (0.0, 20, 0.95, 0.1, 42)
    assert params.greedy

    config = json.loads((ASSETS / "generation_config.json").read_text())
    greedy = SamplingParams.from_generation_config({**config, "do_sample": False})
    assert greedy.greedy and greedy.top_k == 20
    assert not SamplingParams.from_generation_config({**config, "do_sample": False}, temperature=0.6).greedy
    assert SamplingParams.from_generation_config({"top_p": None}) == SamplingParams()
    with pytest.raises(TypeError, match="top_n"):
        SamplingParams.from_generation_config(config, top_n=3)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config({**config, "top_p": 0.0})
