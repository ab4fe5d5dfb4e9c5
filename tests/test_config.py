"""Qwen3Config: presets, both config.json spellings, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from conftest import QWEN3_06B_FILES, hf_config
from qwen3 import PRESETS, ConfigError, Qwen3Config
from qwen3.model import KVCache, Qwen3ForCausalLM

PRESET_TABLE = {  # hidden, intermediate, layers, q heads, tied (from the issue / model cards)
    "0.6B": (1024, 3072, 28, 16, True),
    "1.7B": (2048, 6144, 28, 16, True),
    "4B": (2560, 9728, 36, 32, True),
    "8B": (4096, 12288, 36, 32, False),
    "14B": (5120, 17408, 40, 40, False),
    "32B": (5120, 25600, 64, 64, False),
}


@pytest.mark.parametrize("name", list(PRESET_TABLE))
def test_presets(name):
    c = Qwen3Config.from_preset(name)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.tie_word_embeddings) == PRESET_TABLE[name]  # fmt: skip
    assert (c.vocab_size, c.head_dim, c.num_key_value_heads, c.rope_theta, c.rms_norm_eps) == (
        151936, 128, 8, 1e6, 1e-6)  # fmt: skip
    assert c.max_position_embeddings == 40960
    assert Qwen3Config.from_preset(f"Qwen3-{name.lower()}") == c
    assert set(PRESETS) == set(PRESET_TABLE)


def test_published_0_6b_config_equals_preset():
    assert Qwen3Config.from_json(QWEN3_06B_FILES / "config.json") == Qwen3Config.from_preset("0.6B")


def test_parameter_count_and_kv_bytes_of_0_6b():
    import torch

    config = Qwen3Config.from_preset("0.6B")
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert model.num_parameters() == 596_049_920  # transformers' count for Qwen3-0.6B
    assert model.num_parameters(include_embedding=False) == 596_049_920 - 151936 * 1024
    assert KVCache.bytes_per_token(config, torch.bfloat16) == 112 * 1024


def test_transformers5_rope_parameters_spelling(tmp_path):
    path = tmp_path / "config.json"
    hf = hf_config(rope_theta=123.0, rope_scaling={"rope_type": "linear", "factor": 3.0})
    hf.save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads(path.read_text())
    c = Qwen3Config.from_json(path)
    assert c.rope_theta == 123.0 and c.rope_type == "linear" and c.rope_scaling["factor"] == 3.0


def test_round_trip_is_read_by_transformers(tmp_path):
    from transformers import AutoConfig

    c = Qwen3Config.from_preset(
        "0.6B", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    )
    (tmp_path / "config.json").write_text(c.to_json_string())
    assert Qwen3Config.from_json(tmp_path / "config.json") == c
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
    assert hf.rope_parameters["rope_theta"] == 1e6 and hf.tie_word_embeddings is True


def test_missing_tie_word_embeddings_means_untied_as_in_transformers():
    data = Qwen3Config().to_dict()
    del data["tie_word_embeddings"]
    assert Qwen3Config.from_dict(data).tie_word_embeddings is False


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(num_attention_heads=12, num_key_value_heads=8), "num_attention_heads"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(intermediate_size=-5), "intermediate_size"),
        (dict(num_hidden_layers=2.5), "num_hidden_layers"),
        (dict(vocab_size=None), "vocab_size"),
        (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "rope_type"),
        (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling.factor"),
        (dict(model_type="llama"), "model_type"),
        (dict(rms_norm_eps=0), "rms_norm_eps"),
        (dict(head_dim=7), "head_dim"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_invalid_configs_name_the_field(change, field, tmp_path):
    data = {**Qwen3Config().to_dict(), **change}
    with pytest.raises(ConfigError, match=field):
        Qwen3Config.from_dict(data)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=str(path).replace("\\", "\\\\")):
        Qwen3Config.from_json(path)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        Qwen3Config.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3Config.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "colour": "red", "rope_scaling": 3}')
    with pytest.raises(ConfigError, match="rope_scaling"):
        Qwen3Config.from_json(tmp_path / "config.json")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown '7B'"):
        Qwen3Config.from_preset("7B")


def test_configs_are_frozen_and_share_no_dict():
    """A preset (or the config a model was built from) cannot be changed under the code that shares it."""
    import dataclasses

    preset = PRESETS["0.6B"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.tie_word_embeddings = False
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    a = Qwen3Config.from_preset("0.6B", rope_scaling=yarn)
    b = dataclasses.replace(a, hidden_size=2048)
    assert a.extra is not preset.extra and b.extra is not a.extra
    assert a.rope_scaling is not yarn and b.rope_scaling is not a.rope_scaling
    a.extra["quantization_config"] = {"bits": 8}  # a dict field is still a dict: it changes this config alone
    a.rope_scaling["factor"] = 8.0
    assert "quantization_config" not in preset.extra and "quantization_config" not in b.extra
    assert b.rope_scaling["factor"] == 4.0 and yarn["factor"] == 4.0
    assert Qwen3Config.from_preset("0.6B") == preset and preset.tie_word_embeddings is True
