"""Model sources: local path or Hub id (never a Hub lookup for a path), and the tokenizer files copied beside
new weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qwen3 import hub
from qwen3.hub import TOKENIZER_FILES, ModelNotFoundError, copy_tokenizer_files, resolve_source


@pytest.fixture
def hub_calls(monkeypatch, tmp_path):
    """Record snapshot_download calls instead of reaching the Hub; each returns an empty snapshot directory."""
    import huggingface_hub

    calls = []
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(repo_id)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return calls


@pytest.mark.parametrize(
    "source, message",
    [
        ("runs/nope", "no such model directory: runs/nope"),  # runs/ exists here: a local path
        ("demo/", "no such model directory: demo/ (the shipped demo model is --model demo)"),
        ("Qwen/Qwen3-0.6B/", "no such model directory: Qwen/Qwen3-0.6B/"),  # a trailing slash: a path
        ("./Qwen/Qwen3-0.6B", "no such model directory: ./Qwen/Qwen3-0.6B"),
        ("not a repo/x", "no such model directory: not a repo/x"),  # not a valid repo id
    ],
)
def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, hub_calls, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelNotFoundError) as error:
        resolve_source(source)
    assert str(error.value) == message
    assert hub_calls == []


def test_a_path_object_is_local(tmp_path, monkeypatch, hub_calls):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        resolve_source(Path("Qwen/Qwen3-0.6B"))
    assert hub_calls == []


def test_repo_ids_go_to_the_hub_and_directories_stay_local(tmp_path, monkeypatch, hub_calls):
    monkeypatch.chdir(tmp_path)
    assert resolve_source("Qwen/Qwen3-0.6B") == tmp_path / "snapshot"
    assert hub_calls == ["Qwen/Qwen3-0.6B"]
    (tmp_path / "Qwen" / "Qwen3-0.6B").mkdir(parents=True)
    assert resolve_source("Qwen/Qwen3-0.6B") == Path("Qwen/Qwen3-0.6B")  # a directory wins over the Hub
    assert resolve_source("demo") == hub.DEMO_DIR
    assert hub_calls == ["Qwen/Qwen3-0.6B"]


def test_copy_tokenizer_files_copies_every_tokenizer_file(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    contents = {name: os.urandom(16).hex() for name in TOKENIZER_FILES}
    for name, text in contents.items():
        (source / name).write_text(text)
    (source / "model.safetensors").write_text("not a tokenizer file")
    (out / "tokenizer.json").write_text("stale")
    assert "chat_template.jinja" in TOKENIZER_FILES
    assert sorted(copy_tokenizer_files(source, out)) == sorted(TOKENIZER_FILES)
    assert {p.name: p.read_text() for p in out.iterdir()} == contents  # overwritten, no temporary left
    assert copy_tokenizer_files(out, out) == TOKENIZER_FILES  # a file onto itself: left alone
    assert {p.name: p.read_text() for p in out.iterdir()} == contents
    (source / "chat_template.jinja").unlink()
    assert "chat_template.jinja" not in copy_tokenizer_files(source, tmp_path / "out")


def test_merge_lora_copies_through_the_same_list(tmp_path):
    from qwen3.train import lora

    source, out = tmp_path / "adapter", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    for name in TOKENIZER_FILES:
        (source / name).write_text(name)
    lora.copy_tokenizer_files([source], out)
    assert sorted(p.name for p in out.iterdir()) == sorted(TOKENIZER_FILES)
