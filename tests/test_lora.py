"""LoRA: in-place adapters that keep the base names, training only the adapters, PEFT's file format,
merging into a plain checkpoint, exact resume with dropout, and errors on bad adapters."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen3
from conftest import rel_error
from qwen3.checkpoint import fused_parts, unfuse_state
from qwen3.train import LoRAConfig, TrainError, apply_lora, load_adapter, merge_lora, train
from qwen3.train.cli import main as cli_main
from qwen3.train.lora import LoRALinear, lora_state_dict, save_adapter
from qwen3.train.loss import CausalLMLoss
from qwen3.train.trainer import weight_decay_names
from test_train import TINY_MODEL, build_tiny_tokenizer, eval_losses, save_tiny_model, tiny_run

PARTS = {name.rpartition(".")[2]: name for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
IDS = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture
def base(tmp_path, tiny_tokenizer):
    return save_tiny_model(tmp_path / "base", tiny_tokenizer)


def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """B starts at zero (the adapter is a no-op); give it values so merges and formats are really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_apply_lora_keeps_base_names_and_trains_only_adapters(base):
    model = qwen3.load_model(base)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(IDS)
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "down_proj")))
    assert wrapped == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    state = model.state_dict()
    lora_keys = {k for k in state if ".lora_" in k}
    assert set(state) - lora_keys == set(base_state)  # base checkpoint names unchanged
    assert all(torch.equal(state[k], base_state[k]) for k in base_state)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_keys
    with torch.no_grad():
        assert torch.equal(model(IDS), before)  # B = 0: the adapted model starts as the base
    decay, no_decay = weight_decay_names(CausalLMLoss(model))
    assert sorted(decay) == sorted(f"model.{k}" for k in lora_keys) and no_decay == []


def test_merged_logits_equal_adapter_logits(base):
    model = qwen3.load_model(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
        merged = merge_lora(model)(IDS)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert rel_error(merged, adapted) < 1e-5
    assert rel_error(adapted, qwen3.load_model(base)(IDS).detach()) > 1e-3  # the adapter does change the output


def test_lora_training_lowers_the_loss_and_saves_a_peft_adapter(tmp_path, tiny_tokenizer, base):
    config = tiny_run(
        tmp_path,
        tiny_tokenizer,
        config=None,
        tokenizer=None,
        model=str(base),
        lora_rank=4,
        lora_alpha=8,
        lora_targets=("q_proj", "v_proj", "up_proj"),
        max_steps=12,
        lr=2e-2,
        min_lr=2e-3,
        eval_every=0,
    )
    result = train(config)
    evals = eval_losses(tmp_path / "out")
    assert [s for s, _ in evals] == [0, 12] and evals[1][1] < evals[0][1] - 0.1

    ckpt = result.checkpoint
    assert not (ckpt / "model.safetensors").exists()
    adapter_config = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "up_proj", "v_proj"]
    keys = set(load_file(ckpt / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 3 * TINY_MODEL["num_hidden_layers"]

    model = qwen3.load_model(base)
    load_adapter(model, ckpt)
    base_state = qwen3.load_model(base).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_state.items())  # base weights untouched


# every projection; parts of the fused qkv_proj / gate_up_proj alone (an adapter on their rows only); a mix
PART_TARGETS = [LoRAConfig().targets, ("q_proj",), ("v_proj",), ("gate_proj",), ("k_proj", "up_proj", "o_proj")]


@pytest.mark.parametrize("targets", PART_TARGETS, ids="-".join)
def test_peft_reads_our_adapter_with_equal_logits(tmp_path, base, targets):
    peft = pytest.importorskip("peft")
    from transformers import Qwen3ForCausalLM as HFModel

    model = qwen3.load_model(base)
    config = LoRAConfig(rank=4, alpha=12, targets=targets)
    apply_lora(model, config)
    randomize_adapters(model, seed=1)
    save_adapter(lora_state_dict(model.state_dict()), config, tmp_path / "adapter", base_model=str(base))
    hf = peft.PeftModel.from_pretrained(HFModel.from_pretrained(base, dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        assert rel_error(model(IDS), hf.eval()(IDS).logits) < 1e-5


@pytest.mark.parametrize("targets", PART_TARGETS[1:], ids="-".join)
def test_we_read_a_peft_adapter_with_equal_logits_and_merge_it_into_the_right_rows(tmp_path, base, targets):
    peft = pytest.importorskip("peft")
    from transformers import Qwen3ForCausalLM as HFModel

    hf = HFModel.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(3)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    randomize_adapters(hf, seed=4)
    hf.save_pretrained(tmp_path / "adapter")
    model = qwen3.load_model(base)
    load_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = hf.eval()(IDS).logits
        assert rel_error(model(IDS), expected) < 1e-5
        merged = merge_lora(model)
        assert rel_error(merged(IDS), expected) < 1e-5
    # merged under Hugging Face's names: the adapted parts' rows changed, every other row as in the base
    base_state = qwen3.load_model(base).state_dict()
    hf_merged = hf.merge_and_unload().state_dict()
    for name, tensor in unfuse_state(merged.state_dict(), fused_parts(merged)).items():
        assert rel_error(tensor, hf_merged[name]) < 1e-6, name
    changed = {n for n, t in unfuse_state(merged.state_dict(), fused_parts(merged)).items()
               if not torch.equal(t, unfuse_state(base_state, fused_parts(merged))[n])}  # fmt: skip
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in map(PARTS.get, targets)}


def test_merge_lora_cli_writes_a_plain_checkpoint(tmp_path, base, capsys):
    from transformers import Qwen3ForCausalLM as HFModel

    model = qwen3.load_model(base)
    config = LoRAConfig(rank=2, alpha=4, targets=("o_proj", "gate_proj"))
    apply_lora(model, config)
    randomize_adapters(model, seed=2)
    save_adapter(lora_state_dict(model.state_dict()), config, tmp_path / "adapter", base_model=str(base))
    args = ["merge-lora", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")]
    assert cli_main(args) == 0
    with torch.no_grad():
        expected = model(IDS)
        assert rel_error(qwen3.load_model(tmp_path / "m")(IDS), expected) < 1e-5
        hf = HFModel.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
        assert rel_error(hf(IDS).logits, expected) < 1e-5
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert cli_main(args) == 2  # out is not empty now
    assert "--out: " in capsys.readouterr().err


def test_adapter_and_merged_files_get_the_umask_mode(tmp_path, base):
    from test_train import file_modes

    model = qwen3.load_model(base)
    config = LoRAConfig(rank=2, alpha=4)
    apply_lora(model, config)
    previous = os.umask(0o027)
    try:
        save_adapter(lora_state_dict(model.state_dict()), config, tmp_path / "adapter", base_model=str(base))
        adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "m")
        assert cli_main(["merge-lora", "--model", str(base), "--adapter", adapter, "--out", merged]) == 0
    finally:
        os.umask(previous)
    modes = file_modes(tmp_path / "adapter", tmp_path / "m")
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "m/model.safetensors"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o640)


def test_lora_resume_with_dropout_is_exact(tmp_path, tiny_tokenizer, base):
    """Dropout draws from the RNG, so this also proves the RNG state is saved and restored."""
    common = dict(
        config=None, tokenizer=None, model=str(base), lora_rank=4, lora_dropout=0.3, max_steps=4, eval_every=0
    )
    straight = train(tiny_run(tmp_path, tiny_tokenizer, out="a", **common))
    first = train(tiny_run(tmp_path, tiny_tokenizer, out="b", stop_after=2, **common))
    second = train(tiny_run(tmp_path, tiny_tokenizer, out="b", resume="auto", **common))
    assert first.losses + second.losses == straight.losses
    a, b = (
        load_file(straight.checkpoint / "adapter_model.safetensors"),
        load_file(second.checkpoint / "adapter_model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_adapters_are_clear_errors(tmp_path, base):
    model = qwen3.load_model(base)
    with pytest.raises(TrainError, match=r"--adapter: no adapter_config\.json in"):
        load_adapter(model, tmp_path)
    config = LoRAConfig(rank=4, alpha=8, targets=("q_proj",))
    lora = qwen3.load_model(base)
    apply_lora(lora, config)
    save_adapter(lora_state_dict(lora.state_dict()), config, tmp_path / "a", base_model=None)
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    save_file({**tensors, key: torch.zeros(3, 32)}, path)
    with pytest.raises(TrainError, match=rf"tensor '{key}' has shape \(3, 32\), expected \(4, 32\)"):
        load_adapter(qwen3.load_model(base), tmp_path / "a")
    del tensors[key]
    save_file(tensors, path)
    with pytest.raises(TrainError, match=r"missing 1 adapter tensors"):
        load_adapter(qwen3.load_model(base), tmp_path / "a")
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**data, "use_dora": True}))
    with pytest.raises(TrainError, match=r"adapter_config\.json: use_dora: True is not supported"):
        load_adapter(qwen3.load_model(base), tmp_path / "a")
    with pytest.raises(TrainError, match=r"--lora-targets: \['qkv'\]"):
        LoRAConfig(rank=4, targets=("qkv",))
