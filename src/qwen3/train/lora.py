"""LoRA: low-rank adapters on the attention and MLP projections, saved in PEFT's format.

`apply_lora` swaps each targeted `nn.Linear` (q/k/v/o_proj, gate/up/down_proj) for a `LoRALinear` in place.
The new module holds the *same* weight Parameter under the same attribute name, so the model's state dict
keys do not change (`model.layers.0.self_attn.o_proj.weight` still loads from the base checkpoint), plus
two small matrices:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)

Targets keep Hugging Face's names, also for the parts of the model's fused projections (model.FUSED_PROJECTIONS:
q/k/v_proj are rows of qkv_proj, gate/up_proj of gate_up_proj). A fused projection with targeted parts becomes a
`FusedLoRALinear`: one adapter per targeted part, a submodule named after it (`qkv_proj.q_proj.lora_A.weight`),
adding its B A x to that part's output rows only, which is exactly PEFT's adapter on the separate q_proj.

A starts random (PEFT's Kaiming-uniform), B at zero, so training starts exactly at the base model. The
base weights are frozen; only A and B get gradients and are saved.

On disk an adapter is what PEFT writes: `adapter_config.json` (peft_type LORA, r, lora_alpha,
target_modules, ...) and `adapter_model.safetensors` with keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (`peft_name` maps our names to these),
so `PeftModel.from_pretrained` on transformers' Qwen3ForCausalLM reads it, and adapters PEFT trained on
Qwen3 load here (plain LoRA only: no DoRA, per-layer rank patterns or regex targets). `merge_lora` folds
W + (alpha / r) B A back into plain Linears (a fused one: each part's rows), giving an ordinary checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..checkpoint import CheckpointError, load_model, save_model
from ..config import ConfigError
from ..files import atomic_path, write_text_atomic
from ..hub import MODEL_FILES, TOKENIZER_FILES, ModelNotFoundError, resolve_source
from ..hub import copy_tokenizer_files as hub_copy_tokenizer_files
from ..model import FUSED_PROJECTIONS, Qwen3ForCausalLM
from .data import TrainError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r (PEFT's option)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise TrainError(f"--lora-rank: must be a positive integer, found {self.rank!r}")
        if not self.alpha > 0:
            raise TrainError(f"--lora-alpha: must be positive, found {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise TrainError(f"--lora-dropout: must be in [0, 1), found {self.dropout!r}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise TrainError(f"--lora-targets: {unknown or 'none given'}; choose from {','.join(LORA_TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_peft_dict(self, base_model: str | None) -> dict[str, Any]:
        """adapter_config.json as PEFT writes it (the fields PEFT needs to rebuild the same adapter)."""
        return {
            **self.extra,
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(self.targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], path: str | os.PathLike) -> LoRAConfig:
        """Read a PEFT adapter_config.json; anything this implementation cannot reproduce is an error."""

        def fail(message: str) -> TrainError:
            return TrainError(f"{path}: {message}")

        if data.get("peft_type") != "LORA":
            raise fail(f"peft_type: expected 'LORA', found {data.get('peft_type')!r}")
        targets = data.get("target_modules")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise fail(f"target_modules: expected a list of module names, found {targets!r}")
        for key, allowed in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
            if data.get(key, allowed) != allowed:
                raise fail(f"{key}: {data[key]!r} is not supported (only {allowed!r})")
        for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
            if data.get(key):
                raise fail(f"{key}: per-module settings are not supported")
        try:
            return cls(
                rank=data["r"],
                alpha=float(data["lora_alpha"]),
                dropout=float(data.get("lora_dropout") or 0.0),
                targets=tuple(sorted(targets)),
                use_rslora=bool(data.get("use_rslora", False)),
                extra={k: v for k, v in data.items() if k not in cls().to_peft_dict(None)},
            )
        except KeyError as e:
            raise fail(f"missing field {e.args[0]!r}") from e
        except TrainError as e:
            raise fail(str(e)) from e


class LoRAAdapter(nn.Module):
    """scaling * lora_B(lora_A(dropout(x))): the low-rank update of one projection's output, (.., in) -> (.., out).
    A starts random (PEFT's Kaiming-uniform), B at zero."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default initialisation
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self, dtype: torch.dtype) -> Tensor:
        """scaling * B A (out, in), in `dtype`."""
        return self.scaling * (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype))


def _base_placement(base: nn.Linear) -> dict[str, Any]:
    """Device and dtype for adapters of `base` (a meta-device base: the default device)."""
    return {"device": base.weight.device if base.weight.device.type != "meta" else None, "dtype": base.weight.dtype}


class LoRALinear(LoRAAdapter):
    """y = F.linear(x, weight, bias) + scaling * lora_B(lora_A(dropout(x))); `weight` is the base Linear's."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base.in_features, base.out_features, rank, alpha, dropout, use_rslora, **_base_placement(base))
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: state-dict key and base checkpoint unchanged
        self.bias = base.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + super().forward(x)

    def merged_weight(self) -> Tensor:
        """W + scaling * B A, computed in fp32 at least."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.weight.to(dtype) + self.delta_weight(dtype)).to(self.weight.dtype)


class FusedLoRALinear(nn.Module):
    """A fused projection (qkv_proj, gate_up_proj) with adapters on some of its parts: y = x W^T, then the rows of
    each targeted part p get + scaling B_p A_p dropout(x). `parts` lists every part (its Hugging Face name, e.g.
    "q_proj", and its rows) in row order; each adapter is the submodule named after its part."""

    def __init__(
        self,
        base: nn.Linear,
        parts: list[tuple[str, int]],
        targets: tuple[str, ...],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: state-dict key and base checkpoint unchanged
        self.bias = base.bias
        self.parts = parts
        for name, rows in parts:
            if name in targets:
                adapter = LoRAAdapter(self.in_features, rows, rank, alpha, dropout, use_rslora, **_base_placement(base))
                self.add_module(name, adapter)

    def adapters(self) -> list[LoRAAdapter | None]:
        """Each part's adapter, or None where the part has none, in row order."""
        return [getattr(self, name) if name in self._modules else None for name, _ in self.parts]

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)  # (.., out): every part's rows
        pieces = y.split([rows for _, rows in self.parts], dim=-1)
        return torch.cat([p if a is None else p + a(x) for p, a in zip(pieces, self.adapters(), strict=True)], -1)

    def merged_weight(self) -> Tensor:
        """W + each part's scaling * B A on that part's rows, computed in fp32 at least."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        deltas = [
            a.delta_weight(dtype) if a is not None else self.weight.new_zeros(rows, self.in_features, dtype=dtype)
            for (_, rows), a in zip(self.parts, self.adapters(), strict=True)
        ]
        return (self.weight.to(dtype) + torch.cat(deltas, dim=0)).to(self.weight.dtype)


def apply_lora(model: Qwen3ForCausalLM, config: LoRAConfig) -> list[str]:
    """Put LoRALinear in place of every targeted projection (FusedLoRALinear for a fused one with targeted
    parts) and freeze everything else.

    Returns the (Hugging Face) names of the adapted projections; only their lora_A / lora_B weights require grad."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear):
                continue
            fused = next((f for f in FUSED_PROJECTIONS if path.endswith("." + f)), None)
            if fused is not None:
                names = [part.rpartition(".")[2] for part in FUSED_PROJECTIONS[fused]]  # "q_proj", ...
                targeted = [part for part in names if part in config.targets]
                if not targeted:
                    continue
                parts = list(zip(names, module.split_sizes(child.out_features), strict=True))
                adapted = FusedLoRALinear(
                    child, parts, config.targets, config.rank, config.alpha, config.dropout, config.use_rslora
                )
                setattr(module, child_name, adapted)
                wrapped += [f"{name}.{part}" for part in targeted]
            elif child_name in config.targets:
                setattr(
                    module, child_name, LoRALinear(child, config.rank, config.alpha, config.dropout, config.use_rslora)
                )
                wrapped.append(path)
    if not wrapped:
        raise TrainError(f"--lora-targets: no module of the model is named {', '.join(config.targets)}")
    return wrapped


def peft_name(name: str) -> str:
    """PEFT's key for the adapter tensor `name` of our state dict: `base_model.model.` + the name, with a fused
    projection's part in the fused module's place (`self_attn.qkv_proj.q_proj.lora_A` -> `self_attn.q_proj.lora_A`)."""
    for fused, parts in FUSED_PROJECTIONS.items():
        for part in parts:
            name = name.replace(f".{fused}.{part.rpartition('.')[2]}.", f".{part}.")
    return PEFT_PREFIX + name


def lora_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter tensors of a model's state dict, under PEFT's names (`peft_name`)."""
    return {
        peft_name(name): t.detach().contiguous()
        for name, t in state.items()
        if ".lora_A." in name or ".lora_B." in name
    }


def save_adapter(
    state: dict[str, Tensor], config: LoRAConfig, directory: str | os.PathLike, base_model: str | None
) -> Path:
    """Write adapter_model.safetensors (`state` from `lora_state_dict`) and adapter_config.json, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.cpu() for k, v in state.items()}, tmp, metadata={"format": "pt"})
    write_text_atomic(directory / ADAPTER_CONFIG, json.dumps(config.to_peft_dict(base_model), indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise TrainError(f"--adapter: no {ADAPTER_CONFIG} in {directory}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise TrainError(f"{path}: expected a JSON object")
    return LoRAConfig.from_peft_dict(data, path)


def load_adapter(model: Qwen3ForCausalLM, directory: str | os.PathLike) -> LoRAConfig:
    """Add the adapter in `directory` to `model` (apply_lora + its weights); every tensor must match."""
    config = read_adapter_config(directory)
    apply_lora(model, config)
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise TrainError(f"--adapter: no {ADAPTER_WEIGHTS} in {directory}")
    params = dict(model.named_parameters())
    expected = {peft_name(name): name for name in params if ".lora_A." in name or ".lora_B." in name}
    seen = set()
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise TrainError(f"{path}: not a readable safetensors file ({e})") from e
    with handle as f, torch.no_grad():
        for key in f.keys():
            name = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            if name not in expected:
                raise TrainError(f"{path}: unexpected tensor {key!r} (not a LoRA weight of this model and config)")
            tensor = f.get_tensor(key)
            target = params[expected[name]]
            if tensor.shape != target.shape:
                raise TrainError(
                    f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise TrainError(f"{path}: missing {len(missing)} adapter tensors, e.g. {missing[0]!r}")
    return config


def merge_lora(model: Qwen3ForCausalLM) -> Qwen3ForCausalLM:
    """Replace every LoRALinear (FusedLoRALinear) by a plain Linear holding W + scaling * B A (on each adapted
    part's rows); the result has no adapters."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (LoRALinear, FusedLoRALinear)):
                linear = nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                with torch.no_grad():
                    linear.weight.copy_(child.merged_weight())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_adapter_checkpoint(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """`qwen3 merge-lora`: base checkpoint + adapter -> a plain HF checkpoint in `out` (with tokenizer files).

    The merge is computed in fp32; `dtype` "auto" saves in the base checkpoint's dtype."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise TrainError(f"--out: {out} exists and is not empty; pass --overwrite to replace its checkpoint")
    if dtype != "auto" and dtype not in DTYPES:
        raise TrainError(f"--dtype: expected auto or one of {', '.join(DTYPES)}, found {dtype!r}")
    try:
        model = load_model(base, device="cpu", dtype=torch.float32)
    except (CheckpointError, ConfigError, ModelNotFoundError) as e:
        raise TrainError(f"--model: {e}") from e
    base_dir = resolve_source(base, MODEL_FILES)
    load_adapter(model, adapter)
    merge_lora(model)
    if dtype == "auto":
        dtype = model.config.torch_dtype if model.config.torch_dtype in DTYPES else "float32"
    model = model.to(DTYPES[dtype])
    save_model(model, out)
    copy_tokenizer_files([Path(adapter), base_dir], out, base_source=base)
    return out


def copy_tokenizer_files(sources: list[Path], out: Path, base_source: str | os.PathLike | None = None) -> None:
    """Copy tokenizer (and generation config) files into `out` from the first of `sources` that has a
    tokenizer.json; with none, fetch the tokenizer files of `base_source` (a Hub id) if it has them."""
    for source in sources:
        if (source / "tokenizer.json").is_file():
            break
    else:
        if base_source is None:
            return
        try:
            source = resolve_source(base_source, TOKENIZER_FILES)
        except ModelNotFoundError:
            return
    hub_copy_tokenizer_files(source, out)
