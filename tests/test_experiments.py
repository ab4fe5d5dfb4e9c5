"""Architecture experiments: each variant builds, trains (the loss falls) and round-trips through a checkpoint;
the default config stays exactly Qwen3 (tests/test_parity.py checks it against transformers unchanged)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import qwen3
from conftest import SMALL
from qwen3.config import ConfigError

VARIANTS = {
    "qwen3": {},
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "no-qk-norm": dict(qk_norm=False),
    "layernorm": dict(norm_type="layernorm"),
    "post-norm": dict(norm_position="post"),
    "gelu-mlp": dict(mlp_type="gelu"),
    "rope-theta-1e6": dict(rope_theta=1e6),
}


def config(**overrides) -> qwen3.Qwen3Config:
    return qwen3.Qwen3Config(**{**SMALL, "vocab_size": 64, **overrides})


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains(name):
    """20 AdamW steps on one fixed batch of a repeating pattern: every variant must fit it well."""
    torch.manual_seed(0)
    model = qwen3.Qwen3ForCausalLM(config(**VARIANTS[name]))
    model.init_weights()
    pattern = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(1))
    ids = pattern.repeat(4, 4)[:, :40]  # (4, 40)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_gelu_mlp_matches_swiglu_parameters():
    swiglu = qwen3.Qwen3ForCausalLM(config())
    gelu = qwen3.Qwen3ForCausalLM(config(mlp_type="gelu"))
    count = [sum(p.numel() for p in m.model.layers[0].mlp.parameters()) for m in (swiglu, gelu)]
    assert count[0] == count[1] == 3 * SMALL["hidden_size"] * SMALL["intermediate_size"]


def test_kv_cache_bytes_follow_the_grouping():
    names = ("mha", "qwen3", "mqa")
    per_token = {n: qwen3.KVCache.bytes_per_token(config(**VARIANTS[n]), torch.bfloat16) for n in names}
    assert per_token["mha"] == 2 * per_token["qwen3"] == 4 * per_token["mqa"]


def test_default_config_writes_no_experiment_fields(tmp_path):
    model = qwen3.Qwen3ForCausalLM(config())
    qwen3.save_model(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert not {"qk_norm", "norm_type", "norm_position", "mlp_type"} & set(written)
    assert not any("layernorm" in k and k.endswith("bias") for k in model.state_dict())


@pytest.mark.parametrize("name", ["no-qk-norm", "layernorm", "post-norm", "gelu-mlp"])
def test_variant_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(2)
    model = qwen3.Qwen3ForCausalLM(config(**VARIANTS[name]))
    model.init_weights()
    qwen3.save_model(model, tmp_path)
    loaded = qwen3.load_model(tmp_path)
    assert dataclasses.replace(loaded.config, torch_dtype=model.config.torch_dtype) == model.config
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_post_norm_normalises_the_residual_stream():
    model = qwen3.Qwen3ForCausalLM(config(norm_position="post", norm_type="layernorm"))
    model.init_weights()
    captured = []
    model.model.layers[0].register_forward_hook(lambda module, args, out: captured.append(out))
    model(torch.randint(0, 64, (1, 8)))
    out = captured[0]
    assert torch.allclose(out.mean(-1), torch.zeros(1, 8), atol=1e-5)  # LayerNorm output, unit weight
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(1, 8), atol=1e-3)


def test_invalid_experiment_values_name_the_field():
    with pytest.raises(ConfigError, match="norm_type"):
        config(norm_type="batchnorm")
    with pytest.raises(ConfigError, match="mlp_type"):
        config(mlp_type="relu")


def test_experiment_runner_smoke(tmp_path, monkeypatch):
    """experiments/run.py end to end at a tiny size: a results table row and a loss curve per variant."""
    import importlib.util
    import shutil
    import sys

    from conftest import ASSETS
    from qwen3.hub import DEMO_DIR

    data = tmp_path / "data"
    for part, play, size in (("train", "hamlet", 40_000), ("heldout", "henry_v", 10_000)):
        (data / part).mkdir(parents=True)
        text = (ASSETS / "shakespeare-heldout" / f"{play}.txt").read_text(encoding="utf-8")[:size]
        (data / part / f"{play}.txt").write_text(text, encoding="utf-8")
    (data / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(DEMO_DIR / name, data / "tokenizer" / name)
    path = ASSETS.parents[1] / "experiments" / "run.py"
    spec = importlib.util.spec_from_file_location("experiments_run", path)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    out = tmp_path / "out"
    argv = ["run.py", "--tiny", "--data", str(data), "--out", str(out), "--only", "MQA,post-norm"]
    monkeypatch.setattr(sys, "argv", argv)
    runner.main()
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 4 and "MQA" in table[2] and "post-norm" in table[3]
    results = json.loads((out / "results.json").read_text())
    assert all(math.isfinite(r["main"]["eval_bpb"]) for r in results)
    assert (out / "experiments_loss.png").stat().st_size > 1000

    (out / "experiments_loss.png").unlink()  # --report-only redraws the table and figure from results.json
    monkeypatch.setattr(sys, "argv", ["run.py", "--report-only", "--out", str(out)])
    runner.main()
    assert (out / "results.md").read_text().splitlines() == table
    assert (out / "experiments_loss.png").stat().st_size > 1000


def test_experiments_page_shows_the_committed_results():
    """docs/experiments.md carries the table that experiments/run.py wrote for every variant, the numbers of
    the committed results.json, and the figure drawn from them."""
    import importlib.util
    import re

    from conftest import ASSETS

    root = ASSETS.parents[1]
    spec = importlib.util.spec_from_file_location("experiments_run", root / "experiments" / "run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    page = (root / "docs" / "experiments.md").read_text()
    results = json.loads((root / "docs" / "experiments" / "results.json").read_text())
    assert [r["variant"] for r in results] == list(runner.VARIANTS)
    for r in results:
        m = r["main"]
        assert math.isfinite(m["eval_bpb"]) and m["eval_curve"][-1][1] < m["eval_curve"][0][1]  # it learned
        row = f"| {r['variant']} | {m['eval_bpb']:.3f} | {m['tokens_per_s']:,.0f} | {m['kv_bytes_per_token_bf16']:,} |"
        assert row in page, f"docs/experiments.md: no row {row!r}"
    figures = re.findall(r"!\[[^\]]*\]\((experiments/[\w.-]+\.png)\)", page)
    assert figures, "docs/experiments.md shows no figure"
    for name in figures:
        assert (root / "docs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
