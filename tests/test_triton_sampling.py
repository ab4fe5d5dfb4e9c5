"""The fused sampling kernel (engine/triton_sampling.py) against a float64 reference with the plain path's noise,
and the engine's Sampler with and without it.

On CUDA the kernel runs compiled; without CUDA it runs in Triton's interpreter, in a subprocess started with
TRITON_INTERPRET=1 (it must be set before triton is imported), as in test_triton_kernels.py.
"""

import pytest
import torch

from conftest import run_in_triton_interpreter, triton_test_mode

triton = pytest.importorskip("triton")

_, DEVICE, RUN_KERNELS, kernel_test = triton_test_mode()


@pytest.mark.skipif(RUN_KERNELS, reason="the kernel runs in this process")
def test_sampling_kernel_in_triton_interpreter():
    run_in_triton_interpreter(__file__, select="not in_triton_interpreter")


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_draws_what_the_float64_reference_draws(dtype):
    from qwen3.engine import triton_sampling
    from qwen3.engine.sampler import row_key

    gen = torch.Generator().manual_seed(3)
    S, V = 6, 9000  # three chunks of 4,096, the last one ragged
    logits = (3 * torch.randn(S, V, generator=gen)).to(dtype)
    temperature = torch.tensor([0.0, 0.6, 1.0, 1.7, 0.0, 0.3])
    ids, expected = [], []
    for trial in range(5):
        keys = torch.tensor([row_key(trial * 100 + i, i) for i in range(S)], dtype=torch.int64)
        ids.append(triton_sampling.sample(logits.to(DEVICE), temperature.to(DEVICE), keys.to(DEVICE)).cpu())
        expected.append(triton_sampling.reference(logits, temperature, keys))
    ids, expected = torch.stack(ids), torch.stack(expected)
    assert torch.equal(ids, expected)
    assert torch.equal(ids[:, 0], logits[0].float().argmax().expand(5))  # greedy rows: exact argmax
    assert len(set(ids[:, 3].tolist())) > 1  # a hot row draws different tokens with different keys


@kernel_test
def test_ties_go_to_the_lowest_column_across_chunks():
    from qwen3.engine import triton_sampling

    logits = torch.zeros(2, 9000)
    logits[:, [5000, 100, 8999]] = 7.0  # greedy: the first of three equal maxima, in the second chunk's past
    out = triton_sampling.sample(logits.to(DEVICE), torch.zeros(2).to(DEVICE), torch.zeros(2, dtype=torch.int64)
                                 .to(DEVICE))  # fmt: skip
    assert out.tolist() == [100, 100]


@kernel_test
def test_sampler_uses_the_kernel_for_plain_rows_and_matches_seeded_draws():
    """A seeded temperature row draws the same token through the kernel as through the plain path, except at
    float32 near-ties (none with these logits); filtered rows keep the plain path."""
    from qwen3.engine import triton_sampling
    from qwen3.engine.sampler import Sampler
    from qwen3.engine.sequence import Sequence
    from qwen3.sampling import SamplingParams

    gen = torch.Generator().manual_seed(5)
    V = 5000
    logits = (2 * torch.randn(4, V, generator=gen)).to(DEVICE)
    params = [SamplingParams(temperature=0.8, seed=11), SamplingParams(temperature=1.2, seed=12),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, seed=13)]  # fmt: skip
    calls = []

    def counting(*args):
        calls.append(1)
        return triton_sampling.sample(*args)

    for step in range(4):
        seqs = [Sequence(str(i), [1, 2, 3], p, -1) for i, p in enumerate(params)]
        for seq in seqs:
            seq.token_ids += [7] * step  # the output index is part of a seeded row's key
        plain = Sampler(8, V, torch.device(DEVICE))(logits, seqs)[0]
        fused = Sampler(8, V, torch.device(DEVICE), fused_sample=counting)(logits, seqs)[0]
        assert torch.equal(plain.cpu(), fused.cpu()), step
    assert len(calls) == 4
    filtered = [Sequence("f", [1], SamplingParams(temperature=0.8, top_p=0.9, seed=1), -1)]
    Sampler(8, V, torch.device(DEVICE), fused_sample=counting)(logits[:1], filtered)
    assert len(calls) == 4  # top_p: the plain path


# A row key and column whose hash is 0xFFFFFFFE, the top of the range (found by search): a 24-bit uniform rounded
# to exactly 1.0 there, the noise to 0, and that column won whatever its probability.
EXTREME_KEY, EXTREME_COLUMN = 6795126, 1


def test_the_noise_at_the_top_of_the_hash_range_is_positive_and_finite():
    from qwen3.engine.sampler import seeded_exponential

    noise = seeded_exponential(torch.tensor([EXTREME_KEY]), 8)[0]
    assert torch.isfinite(noise).all() and (noise > 0).all(), noise
    assert 0 < noise[EXTREME_COLUMN] < 1e-6  # the smallest Exp(1) value the hash gives, and not 0


@kernel_test
@pytest.mark.parametrize("candidates", [151936, 4])
def test_flat_rows_draw_the_smallest_noise_as_the_reference_does(candidates):
    """Equal logits: each row's token is its smallest Exp(1) draw. Over the whole vocabulary that draw is ~1e-5, u
    within 2**-16 of 1: the region where the GPU kernel takes the series for -ln(u); among 4 columns it is ~0.25, the
    region of the hardware logarithm. Either way the kernel draws what the float64 reference draws."""
    from qwen3.engine import triton_sampling
    from qwen3.engine.sampler import row_key

    S, V = 8, 151936
    logits = torch.full((S, V), -1e4)
    logits[:, :candidates] = 1.5
    keys = torch.tensor([row_key(7, i) for i in range(S)], dtype=torch.int64)
    temperature = torch.full((S,), 0.7)
    out = triton_sampling.sample(logits.to(DEVICE).to(torch.bfloat16), temperature.to(DEVICE), keys.to(DEVICE))
    expected = triton_sampling.reference(logits.to(torch.bfloat16), temperature, keys)
    assert out.cpu().tolist() == expected.tolist()
    assert len(set(expected.tolist())) > 1


@kernel_test
def test_a_near_certain_token_wins_against_the_extreme_noise():
    from qwen3.engine import triton_sampling

    logits = torch.zeros(1, 8)
    logits[0, 0] = 30.0  # p(0) ~ 1 - 7 * e**-30
    keys = torch.tensor([EXTREME_KEY], dtype=torch.int64)
    out = triton_sampling.sample(logits.to(DEVICE), torch.ones(1).to(DEVICE), keys.to(DEVICE))
    assert out.tolist() == [0]
    assert triton_sampling.reference(logits, torch.ones(1), keys).tolist() == [0]
