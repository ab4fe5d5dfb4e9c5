"""The shipped demo model: it loads by name, it is a real Qwen3 checkpoint (transformers agrees), and its
held-out bits per byte is the figure the README states."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

import qwen3
from conftest import ASSETS, rel_error
from qwen3.cli import main
from qwen3.hub import DEMO_DIR

ROOT = Path(__file__).parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "demo" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_loads_by_name_and_is_small():
    model, tok = qwen3.load_model("demo"), qwen3.load_tokenizer("demo")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA kept
    assert model.num_parameters() == json.loads((DEMO_DIR / "results.json").read_text())["parameters"]
    assert sum(f.stat().st_size for f in DEMO_DIR.iterdir()) <= 25 * 10**6
    assert tok.decode(tok.encode("ROMEO:\nWhat light")) == "ROMEO:\nWhat light"


def test_demo_cli_writes_verse(capsys):
    assert main(["generate", "--model", "demo", "--seed", "0", "--max-new-tokens", "40", "ROMEO:"]) == 0
    out = capsys.readouterr().out
    assert len(out.split()) >= 10 and "\ufffd" not in out


@torch.no_grad()
def test_transformers_reads_the_demo_with_equal_logits():
    from transformers import Qwen3ForCausalLM

    ours = qwen3.load_model("demo")
    theirs = Qwen3ForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()
    ids = torch.tensor([qwen3.load_tokenizer("demo").encode("HAMLET:\nTo be, or not to be, that is the question")])
    assert rel_error(ours(ids), theirs(ids).logits) <= 1e-4


def test_heldout_bits_per_byte_matches_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stated = float(re.search(r"held-out bits per byte \*\*([0-9.]+)\*\*", readme).group(1))
    recorded = json.loads((DEMO_DIR / "results.json").read_text())["heldout_bits_per_byte"]
    assert stated == round(recorded, 2)

    measure = load_script("package_demo").text_bits_per_byte
    model, tok = qwen3.load_model("demo"), qwen3.load_tokenizer("demo")
    texts = [p.read_text(encoding="utf-8") for p in sorted((ASSETS / "shakespeare-heldout").glob("*.txt"))]
    assert len(texts) == 3
    sizes = [len(t.encode()) for t in texts]
    measured = sum(measure(model, tok, t) * n for t, n in zip(texts, sizes, strict=True)) / sum(sizes)
    assert measured == pytest.approx(recorded, abs=1e-3)
