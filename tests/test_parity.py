"""Our model against transformers' Qwen3ForCausalLM on random weights: logits, generation, cache, bf16."""

from __future__ import annotations

import pytest
import torch

import qwen3
from conftest import make_reference, rel_error, rewrite_config, to_hub_style
from qwen3.generate import decode_one, prefill
from qwen3.model import KVCache

# Small configs that differ from each other in every dimension the architecture has.
CONFIGS = {
    "tied-gqa": {},
    "untied-mha-linear": dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16, intermediate_size=80,
        rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False, num_hidden_layers=2,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "untied-mqa-yarn": dict(
        vocab_size=500, hidden_size=48, num_attention_heads=6, num_key_value_heads=1, head_dim=32,
        intermediate_size=128, rms_norm_eps=1e-4, rope_theta=5e5, tie_word_embeddings=False,
        num_hidden_layers=4, max_position_embeddings=256,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "tied-gqa4-yarn-betas": dict(
        hidden_size=96, num_attention_heads=8, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        rope_theta=1e4, num_hidden_layers=2,
        rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
                      "beta_fast": 16, "beta_slow": 2},
    ),
}  # fmt: skip

FP32_TOLERANCE = 1e-4  # max |ours - ref| / max |ref|, as the core issue requires


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request, tmp_path_factory):
    """(reference, ours, vocab) for each config, loaded from the checkpoint the reference saved."""
    directory = tmp_path_factory.mktemp(request.param)
    ref = make_reference(directory, seed=hash(request.param) % 1000, **CONFIGS[request.param])
    return ref, qwen3.load_model(directory), ref.config.vocab_size


def random_ids(vocab: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers(pair):
    ref, ours, vocab = pair
    ids = random_ids(vocab, 3, 150)  # past yarn's original 64/128 positions
    err = rel_error(ours(ids), ref(ids).logits)
    assert err <= FP32_TOLERANCE, err


@torch.no_grad()
def test_explicit_positions_match_transformers_position_ids(pair):
    ref, ours, vocab = pair
    ids = random_ids(vocab, 2, 20, seed=1)
    positions = torch.arange(20).expand(2, 20) + torch.tensor([[7], [90]])
    err = rel_error(ours(ids, positions), ref(ids, position_ids=positions).logits)
    assert err <= FP32_TOLERANCE, err


@torch.no_grad()
def test_textbook_attention_equals_sdpa(pair):
    _, ours, vocab = pair
    ids = random_ids(vocab, 2, 40, seed=2)
    sdpa = ours(ids)
    ours.attention = "textbook"
    try:
        textbook = ours(ids)
        cache = KVCache(ours.config, 2, 64)  # with a cache, S (64) > T: the mask does the work
        textbook_cached = ours(ids, torch.arange(40).expand(2, 40), cache)
    finally:
        ours.attention = "sdpa"
    assert rel_error(textbook, sdpa) <= 1e-5
    assert rel_error(textbook_cached, sdpa) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("attention", ["sdpa", "textbook"])
def test_prefill_then_decode_equals_full_forward(pair, attention):
    _, ours, vocab = pair
    ours.attention = attention
    try:
        ids = random_ids(vocab, 2, 30, seed=3)
        full = ours(ids)
        cache = KVCache(ours.config, 2, 40)
        # prefill 12 tokens in two chunks (5 + 7), then decode the rest one at a time
        first = ours(ids[:, :5], torch.arange(5).expand(2, 5), cache)
        second = prefill_chunk(ours, ids[:, 5:12], 5, cache)
        steps = [decode_one(ours, ids[:, t], torch.full((2,), t), cache) for t in range(12, 30)]
        incremental = torch.cat([first, second, torch.stack(steps, dim=1)], dim=1)
    finally:
        ours.attention = "sdpa"
    assert rel_error(incremental, full) <= 1e-5


def prefill_chunk(model, ids, start, cache):
    B, T = ids.shape
    return model(ids, torch.arange(start, start + T).expand(B, T), cache)


@torch.no_grad()
def test_right_padded_rows_equal_their_own_forward(pair):
    _, ours, vocab = pair
    lengths = [9, 23, 16]
    rows = [random_ids(vocab, 1, n, seed=10 + n) for n in lengths]
    padded = torch.zeros(3, 23, dtype=torch.long)
    for b, r in enumerate(rows):
        padded[b, : r.shape[1]] = r[0]
    cache = KVCache(ours.config, 3, 30)
    last = prefill(ours, padded, torch.tensor(lengths), cache)
    for b, r in enumerate(rows):
        assert rel_error(last[b], ours(r)[0, -1]) <= 1e-5


@torch.no_grad()
def test_greedy_generation_matches_transformers(pair):
    ref, ours, vocab = pair
    for seed in (4, 5):
        prompt = random_ids(vocab, 1, 11, seed=seed)
        expected = ref.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24, pad_token_id=0)
        got = qwen3.generate(ours, prompt, max_new_tokens=24, temperature=0.0)
        assert got.shape == (1, 24)
        assert got.tolist() == expected[:, 11:].tolist()


def test_hub_and_transformers5_config_styles_give_same_logits(tmp_path):
    overrides = CONFIGS["untied-mqa-yarn"]
    ref = make_reference(tmp_path / "v5", seed=7, **overrides)  # transformers 5 writes rope_parameters
    v5 = qwen3.load_model(tmp_path / "v5")
    ref.save_pretrained(tmp_path / "hub")
    rewrite_config(tmp_path / "hub", to_hub_style)
    hub = qwen3.load_model(tmp_path / "hub")
    assert hub.config == v5.config and hub.config.rope_type == "yarn"
    ids = random_ids(500, 1, 100, seed=8)
    with torch.no_grad():
        assert torch.equal(hub(ids), v5(ids))
        assert rel_error(hub(ids), ref(ids).logits) <= FP32_TOLERANCE


@torch.no_grad()
def test_bf16_logits_close_to_fp32(tmp_path):
    """bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); 3 layers of matmuls over 64-96
    wide rows accumulate that to about 1-2% of the largest logit, so we allow 4% on the max error and
    require the fp32 argmax token to keep its rank at the top in nearly every position."""
    make_reference(tmp_path, seed=11)
    fp32 = qwen3.load_model(tmp_path)
    bf16 = qwen3.load_model(tmp_path, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.rope.cos.dtype == torch.float32
    ids = random_ids(320, 2, 64, seed=12)
    a, b = fp32(ids), bf16(ids)
    assert b.dtype == torch.bfloat16
    assert rel_error(b, a) <= 0.04
    agree = (a.argmax(-1) == b.float().argmax(-1)).float().mean().item()
    assert agree >= 0.9


@pytest.mark.slow
@torch.no_grad()
def test_qwen3_0_6b_shape_matches_transformers(tmp_path):
    """The exact published 0.6B config (28 layers, 16/8 heads of 128, tied, vocab 151936), random weights."""
    import json

    from transformers import AutoConfig
    from transformers import Qwen3ForCausalLM as HFModel

    from conftest import QWEN3_06B_FILES, randomize

    published = json.loads((QWEN3_06B_FILES / "config.json").read_text())
    config = AutoConfig.from_pretrained(QWEN3_06B_FILES)
    torch.manual_seed(0)
    ref = HFModel(config).float().eval()
    randomize(ref, seed=0)
    ref.save_pretrained(tmp_path)
    ours = qwen3.load_model(tmp_path)
    cfg = ours.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        published["hidden_size"], published["num_hidden_layers"], published["num_attention_heads"],
        published["num_key_value_heads"],
    )  # fmt: skip
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters()) == 596_049_920
    ids = random_ids(cfg.vocab_size, 2, 48, seed=13)
    err = rel_error(ours(ids), ref(ids).logits)
    print(f"0.6B fp32 relative logit error: {err:.2e}")
    assert err <= FP32_TOLERANCE
    prompt = ids[:1, :16]
    expected = ref.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0)
    assert qwen3.generate(ours, prompt, max_new_tokens=20).tolist() == expected[:, 16:].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 1024), (2, 5, 16, 128)])  # the hidden norms; q_norm/k_norm per head
def test_rmsnorm_equals_the_written_out_formula_and_transformers(dtype, shape):
    """RMSNorm runs F.rms_norm; the textbook steps (fp32 mean square and rescale, round, times the weight) give
    the same bits on the CPU, and transformers' Qwen3RMSNorm the same values."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from qwen3.model import RMSNorm

    gen = torch.Generator().manual_seed(sum(shape))
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(shape[-1], generator=gen))
        x32 = x.float()
        written_out = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        theirs = Qwen3RMSNorm(shape[-1], eps=1e-6).to(dtype)
        theirs.weight.copy_(norm.weight)
        assert torch.equal(norm(x), written_out)
        assert torch.equal(norm(x), theirs(x))
