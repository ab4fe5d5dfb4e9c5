"""Checkpoint I/O: single-file and sharded, tied with and without lm_head, save round trip, errors."""

from __future__ import annotations

import json
import os

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


# ---- dtype and device arguments, non-finite weights, file modes ---------------------------------------


@torch.no_grad()
def test_dtype_by_name(tmp_path):
    make_reference(tmp_path, seed=14)
    by_dtype = qwen3.load_model(tmp_path, dtype=torch.bfloat16)
    for name in ("bfloat16", "bf16", "torch.bfloat16", "BFloat16"):
        by_name = qwen3.load_model(tmp_path, dtype=name, device="cpu")
        assert all(p.dtype == torch.bfloat16 for p in by_name.parameters())
        assert torch.equal(by_name(IDS), by_dtype(IDS))


@pytest.mark.parametrize("dtype", ["float17", "int8", torch.int64, torch.float8_e4m3fn, 3])
def test_bad_dtype_is_a_value_error_naming_the_argument(tmp_path, dtype):
    make_reference(tmp_path, seed=15)
    with pytest.raises(ValueError, match=r"^dtype: .* is not a float dtype for the weights \(one of float32, "):
        qwen3.load_model(tmp_path, dtype=dtype)


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", r"^device 'gpu': not a device name \(cpu, cuda, cuda:1, mps or auto\)$"),
        ("cuda:x", r"^device 'cuda:x': not a device name"),
        ("cuda:99", r"^device 'cuda:99': (no CUDA GPU available|this machine has \d+ CUDA GPU)"),
    ],
)
def test_bad_device_is_a_value_error_naming_the_argument(tmp_path, device, message):
    make_reference(tmp_path, seed=16)
    with pytest.raises(ValueError, match=message):
        qwen3.load_model(tmp_path, device=device)


def test_missing_accelerator_is_a_value_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make_reference(tmp_path, seed=16)
    with pytest.raises(ValueError, match=r"^device 'cuda': no CUDA GPU available to torch on this machine"):
        qwen3.load_model(tmp_path, device="cuda")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_tensor_and_file(tmp_path, bad):
    make_reference(tmp_path, seed=17)
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(tensors):
        position = torch.randint(0, tensors[name].numel(), (3,), generator=torch.Generator().manual_seed(0))
        tensors[name].view(-1)[position.unique()] = bad

    edit_weights(tmp_path / "model.safetensors", poison)
    count = len(torch.randint(0, 96 * 64, (3,), generator=torch.Generator().manual_seed(0)).unique())
    with pytest.raises(CheckpointError, match=rf"^tensor '{name}' in .*model\.safetensors: {count} of 6144 values "):
        qwen3.load_model(tmp_path)


def test_values_that_overflow_the_requested_dtype_are_refused(tmp_path):
    make_reference(tmp_path, seed=18)
    name = "model.layers.0.self_attn.q_proj.weight"
    edit_weights(tmp_path / "model.safetensors", lambda t: t[name].view(-1)[7].fill_(1e6))  # fp16's max: 65504
    qwen3.load_model(tmp_path, dtype="bfloat16")  # bf16 has float32's range
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' in .*model\.safetensors: values overflow"):
        qwen3.load_model(tmp_path, dtype="float16")


def test_integer_tensor_where_a_float_is_expected(tmp_path):
    make_reference(tmp_path, seed=19)
    name = "model.norm.weight"
    edit_weights(tmp_path / "model.safetensors", lambda t: t.update({name: t[name].to(torch.int64)}))
    with pytest.raises(
        CheckpointError, match=rf"tensor '{name}' in .*model\.safetensors: expected a float .* found I64"
    ):
        qwen3.load_model(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("shard_bytes", [2**30, 30_000])
def test_saved_files_get_the_umask_mode(tmp_path, umask, shard_bytes):
    make_reference(tmp_path / "ref", seed=20)
    model = qwen3.load_model(tmp_path / "ref")
    old = os.umask(umask)
    try:
        qwen3.save_model(model, tmp_path / "out", max_shard_bytes=shard_bytes, generation_config={"top_k": 20})
    finally:
        os.umask(old)
    files = list((tmp_path / "out").iterdir())
    assert len(files) >= 3
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o666 & ~umask for f in files}


# ---- fused projections: the model holds qkv_proj / gate_up_proj, files keep Hugging Face's names ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_save_writes_transformers_tensors_bit_identical_both_ways(tmp_path, tied, dtype):
    """HF save -> our load -> our save -> HF load -> HF save: the same names, shapes, dtypes and bits throughout."""
    from transformers import Qwen3ForCausalLM as HFModel

    make_reference(tmp_path / "ref", seed=11, dtype=dtype, tie_word_embeddings=tied)
    theirs = load_file(tmp_path / "ref" / "model.safetensors")
    ours_model = qwen3.load_model(tmp_path / "ref", dtype=dtype)
    qwen3.save_model(ours_model, tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
    HFModel.from_pretrained(tmp_path / "ours", dtype=dtype).save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == theirs.keys()
    assert all(again[k].dtype == theirs[k].dtype and torch.equal(again[k], theirs[k]) for k in theirs)


def test_fused_parts_come_from_the_one_table_and_give_transformers_names(tmp_path):
    from transformers import Qwen3ForCausalLM as HFModel

    from conftest import SMALL, hf_config
    from qwen3.checkpoint import fused_parts, unfuse_state
    from qwen3.model import FUSED_PROJECTIONS

    config = qwen3.Qwen3Config(**SMALL)
    with torch.device("meta"):
        ours = qwen3.Qwen3ForCausalLM(config)
        theirs = HFModel(hf_config())
    state = {k: (tuple(t.shape), t.dtype) for k, t in ours.state_dict().items()}
    parts = fused_parts(ours)
    layers = config.num_hidden_layers
    assert len(parts) == len(FUSED_PROJECTIONS) * layers  # every fused tensor, in every layer
    expected = {k: (tuple(t.shape), t.dtype) for k, t in theirs.state_dict().items()}
    assert unfuse_state(state, parts) == expected  # the names and shapes transformers uses, nothing else
    nh, nkv, D, features = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                            config.intermediate_size)  # fmt: skip
    assert [rows for _, rows in parts["model.layers.0.self_attn.qkv_proj.weight"]] == [nh * D, nkv * D, nkv * D]
    assert [rows for _, rows in parts["model.layers.0.mlp.gate_up_proj.weight"]] == [features, features]


def test_missing_and_misshaped_parts_of_a_fused_tensor_name_the_file_tensor(tmp_path):
    make_reference(tmp_path, seed=12)
    edit_weights(tmp_path / "model.safetensors", lambda t: t.pop("model.layers.0.self_attn.v_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors .*model\.layers\.0\.self_attn\.v_proj\.weight$"):
        qwen3.load_model(tmp_path)
    make_reference(tmp_path, seed=12)

    def grow(t):
        k = t["model.layers.1.self_attn.k_proj.weight"]
        t["model.layers.1.self_attn.k_proj.weight"] = torch.cat([k, k])

    edit_weights(tmp_path / "model.safetensors", grow)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' in .*model\.safetensors"):
        qwen3.load_model(tmp_path)
