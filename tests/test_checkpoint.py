"""Checkpoint I/O: single-file and sharded, tied with and without lm_head, save round trip, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen3
from conftest import make_reference, rel_error
from qwen3 import CheckpointError
from qwen3.hub import ModelNotFoundError

IDS = torch.randint(0, 320, (2, 25), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_sharded_checkpoint_loads(tmp_path):
    ref = make_reference(tmp_path / "ref", seed=1, tie_word_embeddings=False)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 3 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = qwen3.load_model(tmp_path / "sharded")
    assert rel_error(ours(IDS), ref(IDS).logits) <= 1e-4


@torch.no_grad()
def test_tied_checkpoint_with_and_without_stored_lm_head(tmp_path):
    ref = make_reference(tmp_path, seed=2)
    stored = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in stored  # transformers drops the tied copy
    without = qwen3.load_model(tmp_path)
    assert without.lm_head.weight is without.model.embed_tokens.weight
    stored["lm_head.weight"] = stored["model.embed_tokens.weight"].clone()
    save_file(stored, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with_head = qwen3.load_model(tmp_path)
    assert with_head.lm_head.weight is with_head.model.embed_tokens.weight
    assert torch.equal(with_head(IDS), without(IDS))
    assert rel_error(with_head(IDS), ref(IDS).logits) <= 1e-4


def test_weights_converted_to_requested_dtype_and_device(tmp_path):
    make_reference(tmp_path, seed=3, dtype=torch.bfloat16)
    model = qwen3.load_model(tmp_path, dtype=torch.float32, device="cpu")
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    assert not any(t.is_meta for t in [*params, *model.buffers()])
    assert not any(p.requires_grad is False for p in params)  # trainable after loading


@torch.no_grad()
@pytest.mark.parametrize("tied", [True, False])
def test_save_round_trip_loads_in_transformers(tmp_path, tied):
    from transformers import Qwen3ForCausalLM as HFModel

    make_reference(tmp_path / "ref", seed=4, tie_word_embeddings=tied)
    ours = qwen3.load_model(tmp_path / "ref")
    qwen3.save_model(ours, tmp_path / "out")
    theirs = HFModel.from_pretrained(tmp_path / "out").eval()
    assert theirs.config.tie_word_embeddings is tied
    assert rel_error(theirs(IDS).logits, ours(IDS)) <= 1e-6
    assert torch.equal(qwen3.load_model(tmp_path / "out")(IDS), ours(IDS))


@torch.no_grad()
def test_save_sharded_round_trip_and_stale_files_removed(tmp_path):
    from transformers import Qwen3ForCausalLM as HFModel

    make_reference(tmp_path / "ref", seed=5, tie_word_embeddings=False)
    ours = qwen3.load_model(tmp_path / "ref")
    out = tmp_path / "out"
    qwen3.save_model(ours, out)  # single file first
    qwen3.save_model(ours, out, max_shard_bytes=30_000)  # then sharded over it
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert not list(out.glob("*.tmp"))
    assert torch.equal(qwen3.load_model(out)(IDS), ours(IDS))
    assert rel_error(HFModel.from_pretrained(out).eval()(IDS).logits, ours(IDS)) <= 1e-6
    qwen3.save_model(ours, out)  # and back to one file: the shards and index go away
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]


def test_save_keeps_dtype(tmp_path):
    make_reference(tmp_path / "ref", seed=6)
    qwen3.save_model(qwen3.load_model(tmp_path / "ref", dtype=torch.bfloat16), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "out" / "model.safetensors").values())


# ---- errors name the tensor, the shapes and the file ------------------------------------------------


def edit_weights(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
    make_reference(tmp_path, seed=7)
    edit_weights(tmp_path / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors .*model\.layers\.1\.self_attn\.k_norm\.weight"):
        qwen3.load_model(tmp_path)


def test_untied_config_without_lm_head_is_missing_lm_head(tmp_path):
    make_reference(tmp_path, seed=8, tie_word_embeddings=False)
    edit_weights(tmp_path / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing tensors.*lm_head.weight"):
        qwen3.load_model(tmp_path)


def test_unexpected_tensor(tmp_path):
    make_reference(tmp_path, seed=9)
    edit_weights(tmp_path / "model.safetensors", lambda t: t.update({"model.layers.0.mlp.bias": torch.zeros(3)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.bias' in .*model\.safetensors"
    ):
        qwen3.load_model(tmp_path)


def test_shape_mismatch(tmp_path):
    make_reference(tmp_path, seed=10)

    def shrink(t):
        t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.2.mlp.up_proj.weight"][:50]

    edit_weights(tmp_path / "model.safetensors", shrink)
    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.2\.mlp\.up_proj\.weight' in .*model\.safetensors: "
        r"expected shape \(96, 64\), found \(50, 64\)",
    ):
        qwen3.load_model(tmp_path)


def test_no_weights_and_bad_files(tmp_path):
    make_reference(tmp_path, seed=11)
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.bin")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        qwen3.load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        qwen3.load_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(CheckpointError, match="lists model-00002-of-00002.safetensors, which does not exist"):
        qwen3.load_model(tmp_path)


def test_pickle_checkpoints_are_never_read(tmp_path):
    ref = make_reference(tmp_path, seed=12)
    (tmp_path / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        qwen3.load_model(tmp_path)


def test_offline_hub_id_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotFoundError, match="cannot download Qwen/Qwen3-0.6B: offline"):
        qwen3.load_model("Qwen/Qwen3-0.6B")


def test_hub_id_served_from_cache_offline(tmp_path, monkeypatch):
    """A snapshot already in the HF cache loads with HF_HUB_OFFLINE=1 and no network."""
    import huggingface_hub.constants as constants

    ref = make_reference(tmp_path / "ref", seed=13)
    cache = tmp_path / "hf" / "hub"
    snapshot = cache / "models--someone--tiny-qwen3" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in (tmp_path / "ref").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--someone--tiny-qwen3" / "refs").mkdir()
    (cache / "models--someone--tiny-qwen3" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    ours = qwen3.load_model("someone/tiny-qwen3")
    with torch.no_grad():
        assert rel_error(ours(IDS), ref(IDS).logits) <= 1e-4


def test_not_a_directory_nor_repo_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        qwen3.load_model(tmp_path / "nope")
