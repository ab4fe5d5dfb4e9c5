"""The guide in docs/ stays true: its figures draw, its snippets run, and its links and commands point at real code.

- scripts/figures.py --tiny draws every figure as a valid, non-blank PNG; the committed ones exist too.
- Every ```python block of docs/*.md runs (fresh namespace, seeded).
- Every link into src/qwen3/*.py#L<a>-L<b> points where its text says: a link named after a def/class
  spans exactly that definition (found with ast, decorators included), and a link whose text is a line
  of code points at a line holding that code. When model.py moves, the failure names the right lines.
- Every pytest command in the pages names a test file and function that exist.
- The attention weights that scripts/figures.py recomputes from what the backend hands to the dense formula
  rebuild the attention module's own output.
- The recording backend behind causal_mask.png changes no logit and records the masks the backends build.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

import qwen3

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCRIPT = ROOT / "scripts" / "figures.py"
PAGES = sorted(DOCS.glob("*.md"))
# The model's component pages; the engine and server pages (the engine half) have no figure of their own.
COMPONENT_PAGES = [page for page in PAGES if page.name not in ("README.md", "experiments.md", "engine.md", "server.md")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SOURCE_LINK = re.compile(r"\[(`[^`]+`)\]\((\.\./src/qwen3/[\w/]+\.py)#L(\d+)(?:-L(\d+))?\)")
ANY_LINE_LINK = re.compile(r"\]\(\.\./src/qwen3/[^)]*#L")
RELATIVE_LINK = re.compile(r"\]\((?!https?://|#)([^)#\s]+)(?:#[^)]*)?\)")
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
PYTEST_TARGET = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?")


def load_figures_module():
    spec = importlib.util.spec_from_file_location("docs_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures():
    return load_figures_module()


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name}: not a PNG"
    image = matplotlib.image.imread(path)  # (height, width, channels) floats in [0, 1]
    assert image.ndim == 3 and image.shape[0] >= 150 and image.shape[1] >= 150, f"{path.name}: {image.shape}"
    assert image.var() > 0, f"{path.name}: a blank image"
    inked = (image[..., :3] < 0.9).any(axis=-1).mean()  # share of pixels that are not (near) white
    assert inked > 0.02, f"{path.name}: only {inked:.1%} of the pixels carry anything"


# ---------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------


def test_figures_script_draws_every_figure(tmp_path, figures):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    drawn = sorted(p.stem for p in tmp_path.glob("*.png"))
    assert drawn == sorted(figures.FIGURES)
    for name in drawn:
        assert_valid_png(tmp_path / f"{name}.png")


def test_committed_figures_are_the_ones_the_pages_show(figures):
    shown = {name for page in PAGES for name in re.findall(r"figures/([\w-]+)\.png", page.read_text())}
    committed = {p.stem for p in (DOCS / "figures").glob("*.png")}
    assert shown == committed  # every committed image is shown, every shown one is committed
    assert set(figures.FIGURES) <= committed  # the drawn ones, beside e.g. server.md's screenshot of the page
    for name in committed:
        path = DOCS / "figures" / f"{name}.png"
        assert path.stat().st_size < 300 * 1024, f"{name}.png: {path.stat().st_size} bytes"
        assert_valid_png(path)


def test_only_draws_the_named_figure_and_is_deterministic(tmp_path, figures):
    first = figures.make_figures(tmp_path / "a", tiny=True, only=["causal_mask"])
    second = figures.make_figures(tmp_path / "b", tiny=True, only=["causal_mask"])
    assert [p.name for p in first] == ["causal_mask.png"] == [p.name for p in tmp_path.joinpath("a").iterdir()]
    assert first[0].read_bytes() == second[0].read_bytes()
    with pytest.raises(ValueError, match="unknown figure"):
        figures.make_figures(tmp_path / "c", tiny=True, only=["no_such_figure"])


# ---------------------------------------------------------------------------------------------------
# The attention capture behind attention_patterns.png
# ---------------------------------------------------------------------------------------------------


def random_gqa_model() -> qwen3.Qwen3ForCausalLM:
    """Random weights, norm scales included, in a shape where nh * D != H."""
    config = qwen3.Qwen3Config(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rope_theta=1e4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = qwen3.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("which", ["random", "demo"])
def test_captured_attention_rebuilds_the_module_output(figures, which):
    if which == "demo":
        model = qwen3.load_model("demo")
        ids = torch.tensor([qwen3.load_tokenizer("demo").encode(figures.VERSE)])
    else:
        model = random_gqa_model()
        ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    captures = figures.capture_attention(model, ids)
    assert model.attention == "sdpa"  # restored
    B, T = ids.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert len(captures) == model.config.num_hidden_layers
    for capture in captures:
        assert capture.weights.shape == (B, model.config.num_attention_heads, T, T)
        torch.testing.assert_close(capture.weights.sum(-1), torch.ones(B, model.config.num_attention_heads, T))
        assert (capture.weights[..., ~causal] == 0).all()
        scale = capture.output.abs().max()
        assert (capture.recomputed - capture.output).abs().max() <= 1e-5 * scale


def test_recording_backend_is_transparent_and_sees_the_backends_masks(figures):
    """causal_mask.png shows what RecordingBackend records: the logits are unchanged, CausalAttention hands
    the formula no mask, and a KVCache's mask lets position p read exactly the slots 0..p."""
    model = random_gqa_model()
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 7), generator=generator)
    positions = torch.stack([torch.arange(7), torch.arange(3, 10)])  # (B, T): row 1 starts at position 3
    causal = figures.RecordingBackend(qwen3.model.CausalAttention())
    cached = figures.RecordingBackend(qwen3.KVCache(model.config, 2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, cache=causal), model(ids), rtol=0, atol=0)
        through = model(ids, positions, cached)
        expected = model(ids, positions, qwen3.KVCache(model.config, 2, 12))
    torch.testing.assert_close(through, expected, rtol=0, atol=0)
    assert [c.layer for c in causal.calls] == [c.layer for c in cached.calls] == [0, 1, 2]
    assert all(c.mask is None for c in causal.calls)
    for call in cached.calls:
        assert call.mask.shape == (2, 1, 7, 12)
        for b in range(2):
            for t in range(7):
                p = int(positions[b, t])
                assert call.mask[b, 0, t].tolist() == [s <= p for s in range(12)], (b, t)


# ---------------------------------------------------------------------------------------------------
# The pages
# ---------------------------------------------------------------------------------------------------


def test_every_component_page_has_its_parts():
    assert len(COMPONENT_PAGES) == 8
    index = (DOCS / "README.md").read_text()
    for page in COMPONENT_PAGES:
        text = page.read_text()
        assert f"({page.name})" in index, f"README.md does not link {page.name}"
        assert SOURCE_LINK.search(text), f"{page.name}: no link to the code"
        assert re.search(r"!\[[^\]]*\]\(figures/\w+\.png\)", text), f"{page.name}: no figure"
        assert ".venv/bin/pytest tests/" in text, f"{page.name}: no test command"
        assert PYTHON_BLOCK.search(text), f"{page.name}: no snippet"


SNIPPETS = [(page.name, i, code) for page in PAGES for i, code in enumerate(PYTHON_BLOCK.findall(page.read_text()))]


@pytest.mark.parametrize("page,index,code", SNIPPETS, ids=[f"{page}[{i}]" for page, i, _ in SNIPPETS])
def test_snippet_runs(page, index, code):
    if re.search(r"https?://(127\.0\.0\.1|localhost)[:/]", code):
        pytest.skip("a client of a running `qwen3 serve` (tests/test_server.py runs the server)")
    torch.manual_seed(0)
    exec(compile(code, f"docs/{page} python block {index}", "exec"), {"__name__": "__main__"})


def definitions(path: Path) -> dict[str, list[tuple[int, int]]]:
    """Qualified name -> [(first line, decorators included; last line)] of every def and class in a file."""
    spans: dict[str, list[tuple[int, int]]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                spans.setdefault(prefix + child.name, []).append((start, child.end_lineno))
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
    return spans


def source_link_problems(page: Path) -> list[str]:
    problems = []
    text = page.read_text()
    if len(ANY_LINE_LINK.findall(text)) != len(SOURCE_LINK.findall(text)):
        problems.append(f"{page.name}: a line link into src/qwen3 is not of the form [`code`](...#L<a>[-L<b>])")
    for label, target, start, end in SOURCE_LINK.findall(text):
        path = (page.parent / target).resolve()
        name = label.strip("`").removesuffix("()")
        if not path.exists():
            problems.append(f"{page.name}: {target} does not exist")
            continue
        lines = path.read_text().splitlines()
        start, end = int(start), int(end) if end else None
        spans = definitions(path).get(name)
        if spans is not None:
            if (start, end) not in spans:
                right = " or ".join(f"#L{a}-L{b}" for a, b in spans)
                problems.append(f"{page.name}: {name} is at {target}{right}, the link says #L{start}-L{end}")
        elif not 1 <= start <= len(lines) or name not in lines[start - 1]:
            found = [i + 1 for i, line in enumerate(lines) if name in line]
            problems.append(f"{page.name}: `{name}` is on line(s) {found} of {target}, the link says #L{start}")
        elif end is not None and end < start:
            problems.append(f"{page.name}: {target}#L{start}-L{end} ends before it starts")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_code_links_point_at_what_they_name(page):
    problems = source_link_problems(page)
    assert problems == [], (
        "run `python scripts/figures.py --update-links` after checking the code moved:\n" + "\n".join(problems)
    )


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    missing = [t for t in RELATIVE_LINK.findall(prose) if not (page.parent / t).exists()]
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_pytest_commands_name_existing_tests(page):
    commands = [line for line in page.read_text().splitlines() if line.startswith(".venv/bin/pytest")]
    for command in commands:
        for file, function in PYTEST_TARGET.findall(command):
            path = ROOT / file
            assert path.exists(), f"{page.name}: {file} does not exist"
            if function:
                assert re.search(rf"^def {function}\(", path.read_text(), re.MULTILINE), f"{file}::{function}"


def test_link_checker_catches_a_stale_link(tmp_path):
    """The checker itself: a link to the wrong lines or to a line without the quoted code is reported."""
    rmsnorm = definitions(ROOT / "src" / "qwen3" / "model.py")["RMSNorm"][0]
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    (tmp_path / "src").symlink_to(ROOT / "src")
    page.write_text(
        f"[`RMSNorm`](../src/qwen3/model.py#L{rmsnorm[0]}-L{rmsnorm[1]}) is right, "
        f"[`RMSNorm`](../src/qwen3/model.py#L{rmsnorm[0] + 1}-L{rmsnorm[1]}) is off by one, "
        f"[`return self.lm_head(hidden)`](../src/qwen3/model.py#L{rmsnorm[0]}) points at the wrong line."
    )
    problems = source_link_problems(page)
    assert len(problems) == 2, problems
    assert f"#L{rmsnorm[0]}-L{rmsnorm[1]}" in problems[0] and "return self.lm_head(hidden)" in problems[1]


def test_update_links_repairs_stale_links(tmp_path, figures):
    """scripts/figures.py --update-links moves drifted links back onto what they name."""
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    (tmp_path / "src").symlink_to(ROOT / "src")
    page.write_text(
        "[`RMSNorm`](../src/qwen3/model.py#L1-L2), [`KVCache.update`](../src/qwen3/model.py#L3-L4) and "
        "[`mask = (slots[None, None, :] <= positions[:, :, None])[:, None]`](../src/qwen3/model.py#L5)."
    )
    assert len(source_link_problems(page)) == 3
    assert figures.update_source_links(page) == []
    assert source_link_problems(page) == []
