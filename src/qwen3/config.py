"""Qwen3Config: the model's hyper-parameters, with the exact field names of Hugging Face's `config.json`.

Two spellings of the rotary settings exist in the wild and both are read:
- the Hub's (transformers 4): top-level `rope_theta` plus `rope_scaling: {rope_type|type, factor, ...} | null`;
- transformers 5's: `rope_parameters: {rope_theta, rope_type, factor, ...}`.
Internally there is one spelling, the Hub's, and that is what `to_dict` writes (transformers 4 and 5 both
read it). A missing `tie_word_embeddings` means False, as in transformers' `Qwen3Config`; the Hub's
0.6B-4B configs set it to true explicitly, and we always write it explicitly.

A config is frozen: a preset, or the config a model was built from, cannot be changed under the code that
shares it. Derive a new one with `dataclasses.replace` (or `from_preset(name, **overrides)`). The dict
fields (`rope_scaling`, `extra`) are copied into each new config, so no two configs share one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROPE_TYPES = ("default", "linear", "yarn")
EXPERIMENT_CHOICES = {
    "qk_norm": (True, False),
    "norm_type": ("rmsnorm", "layernorm"),
    "norm_position": ("pre", "post"),
    "mlp_type": ("swiglu", "gelu"),
}


class ConfigError(ValueError):
    """A config.json field is missing, of the wrong type or out of range; the message names the field."""


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"yarn", "factor": ..., ...}
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    attention_bias: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    torch_dtype: str | None = "bfloat16"  # the dtype the weights were saved in; informational
    model_type: str = "qwen3"
    # Architecture experiments (docs/experiments.md). The defaults are Qwen3; a field is written to
    # config.json only when it differs, so real checkpoints are untouched. transformers ignores them:
    # a checkpoint with a non-default value is ours alone.
    qk_norm: bool = True  # RMSNorm on each query and key head before RoPE
    norm_type: str = "rmsnorm"  # or "layernorm" (mean-centred, with a bias)
    norm_position: str = "pre"  # or "post": normalise after each residual addition (original Transformer)
    mlp_type: str = "swiglu"  # or "gelu": down(gelu(up(x))) with 1.5 x intermediate_size units (same parameters)
    # Fields we do not use but keep so that a config survives a load/save round trip unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # frozen: the dict fields are copied through object.__setattr__ so that no two configs share one
        object.__setattr__(self, "extra", dict(self.extra))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        self.validate()

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def validate(self) -> None:
        """Raise ConfigError naming the first field that is wrong."""
        if self.model_type != "qwen3":
            raise ConfigError(f"model_type: expected 'qwen3', found {self.model_type!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, found {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads: {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: rotary embedding needs an even head_dim, found {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name}: must be a positive number, found {value!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act: Qwen3 uses 'silu' (SwiGLU), found {self.hidden_act!r}")
        if self.attention_bias:
            raise ConfigError("attention_bias: Qwen3 has no biases; true is not supported")
        for name, allowed in EXPERIMENT_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {allowed}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling.rope_type: {self.rope_type!r} is not one of {ROPE_TYPES}")
        if self.rope_type != "default":
            factor = self.rope_scaling.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
                raise ConfigError(f"rope_scaling.factor: must be a positive number, found {factor!r}")

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- config.json in and out ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Qwen3Config:
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # transformers 5 style: rope_parameters holds rope_theta and the scaling fields together.
        rope_parameters = data.pop("rope_parameters", None)
        if rope_parameters is not None:
            if not isinstance(rope_parameters, dict):
                raise ConfigError(f"rope_parameters: expected an object, found {rope_parameters!r}")
            rope_parameters = dict(rope_parameters)
            if "rope_theta" in rope_parameters:
                data.setdefault("rope_theta", rope_parameters.pop("rope_theta"))
            rope_parameters.pop("partial_rotary_factor", None)
            scaling_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if scaling_type != "default" and data.get("rope_scaling") is None:
                data["rope_scaling"] = rope_parameters
        if data.get("rope_scaling") is not None and not isinstance(data["rope_scaling"], dict):
            raise ConfigError(f"rope_scaling: expected an object or null, found {data['rope_scaling']!r}")
        if data.get("head_dim") is None and "hidden_size" in data and "num_attention_heads" in data:
            data["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
        if data.get("num_key_value_heads") is None and "num_attention_heads" in data:
            data["num_key_value_heads"] = data["num_attention_heads"]
        data.setdefault("tie_word_embeddings", False)
        if "dtype" in data and "torch_dtype" not in data:  # transformers 5 renamed it
            data["torch_dtype"] = data.pop("dtype")
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        for name in EXPERIMENT_CHOICES:
            if out[name] == EXPERIMENT_DEFAULTS[name]:
                del out[name]
        out.setdefault("architectures", ["Qwen3ForCausalLM"])
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Qwen3Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no such file") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from e

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Qwen3Config:
        key = name.upper().removeprefix("QWEN3-").removeprefix("QWEN/QWEN3-")
        if key not in PRESETS:
            raise ConfigError(f"preset: unknown {name!r}; known presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[key], **overrides)


def _preset(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        tie_word_embeddings=tied,
    )


# The official dense sizes; everything not listed is shared (vocab 151936, head_dim 128, 8 KV heads,
# rope_theta 1e6, eps 1e-6, max_position_embeddings 40960).
PRESETS: dict[str, Qwen3Config] = {
    "0.6B": _preset(1024, 3072, 28, 16, tied=True),
    "1.7B": _preset(2048, 6144, 28, 16, tied=True),
    "4B": _preset(2560, 9728, 36, 32, tied=True),
    "8B": _preset(4096, 12288, 36, 32, tied=False),
    "14B": _preset(5120, 17408, 40, 40, tied=False),
    "32B": _preset(5120, 25600, 64, 64, tied=False),
}


EXPERIMENT_DEFAULTS = {name: Qwen3Config.__dataclass_fields__[name].default for name in EXPERIMENT_CHOICES}
