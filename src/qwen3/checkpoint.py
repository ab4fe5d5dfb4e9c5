"""Hugging Face checkpoints in and out: `config.json` plus safetensors, single-file or sharded with an index.

Loading builds the module on the meta device (no memory), reads each tensor straight from the
safetensors file to the target device, converts it to the requested dtype, and assigns it: peak memory
stays near one copy of the weights. Every tensor is checked by name and shape against the model the
config describes; anything missing, unexpected or mis-shaped is an error naming the tensor and the file.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import Qwen3Config
from .hub import MODEL_FILES, resolve_source
from .model import Qwen3ForCausalLM
from .quantize import prepare_int8_modules, quantization_config, retie_lm_head

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint does not match the model its config describes; the message names tensor and file."""


def load_model(
    source: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
    progress: bool = False,
) -> Qwen3ForCausalLM:
    """Load a Qwen3 checkpoint from a directory or a Hub repo id (e.g. "Qwen/Qwen3-0.6B").

    `progress` shows a progress bar over the tensors (downloads always show huggingface_hub's bars).
    """
    directory = resolve_source(source, MODEL_FILES)
    config = Qwen3Config.from_json(directory / "config.json")
    quantization = config.extra.get("quantization_config")
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config, attention=attention)
        if quantization is not None:
            prepare_int8_modules(model, quantization)  # int8 weights + float scales (quantize.py)
    expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    # A tied LM head (lm_head.weight, plus lm_head.weight_scale when int8) is the embedding's: not read.
    tied = [name for name in expected if name.startswith("lm_head.")] if config.tie_word_embeddings else []
    for name in tied:
        expected.pop(name)

    state: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress, leave=False)
    for name, tensor, path in _read_tensors(directory, device):
        bar.update()
        if name in tied:
            continue  # some tied checkpoints store a copy of the embedding; the embedding wins
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} in {path} (not part of a Qwen3 model of this config)")
        shape, expected_dtype = expected[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"tensor {name!r} in {path}: expected shape {shape}, found {tuple(tensor.shape)}")
        if (tensor.dtype == torch.int8) != (expected_dtype == torch.int8):
            raise CheckpointError(f"tensor {name!r} in {path}: expected {expected_dtype}, found {tensor.dtype}")
        if tensor.dtype == torch.int8:
            # safetensors may hand out a tensor at any byte offset; the CPU int8 kernel needs aligned rows
            state[name] = tensor.clone() if tensor.data_ptr() % 64 else tensor
        else:
            state[name] = tensor.to(dtype)
    bar.close()
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"missing tensors in {directory}: {shown}")

    for name in tied:
        state[name] = state["model.embed_tokens." + name.removeprefix("lm_head.")]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        retie_lm_head(model)  # assign=True replaced the shared Parameters; make them one again
    model.init_buffers(device)
    return model.eval()


def checkpoint_files(directory: Path) -> list[tuple[Path, list[str]]]:
    """(file, names of the tensors it holds) for a single-file or sharded (indexed) safetensors checkpoint,
    every file's header read and checked against the index."""
    if (directory / INDEX_FILE).is_file():
        index_path = directory / INDEX_FILE
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a safetensors index (needs a 'weight_map' object)") from e
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    out = []
    for file in files:
        path = directory / file
        if not path.is_file():
            raise CheckpointError(f"{INDEX_FILE} in {directory} lists {file}, which does not exist")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:  # reads the header only
                names = list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        for name in names:
            if weight_map is not None and weight_map.get(name) != file:
                raise CheckpointError(f"tensor {name!r} in {path} is not listed for that file in {INDEX_FILE}")
        out.append((path, names))
    return out


def _read_tensors(directory: Path, device: torch.device | str) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) for every tensor of a single-file or sharded safetensors checkpoint."""
    for path, names in checkpoint_files(directory):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in names:
                yield name, f.get_tensor(name), path


def save_model(
    model: Qwen3ForCausalLM,
    directory: str | os.PathLike,
    max_shard_bytes: int = 5 * 2**30,
    generation_config: dict | None = None,
) -> Path:
    """Write `config.json` and safetensors in Hugging Face's layout; shard above `max_shard_bytes`.

    Every file is written to a temporary name and renamed into place, and shards of an earlier save
    that the new one does not use are removed only after the new files are complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:  # HF convention: the tied copy (and its int8 scales) is not stored
        state = {name: t for name, t in state.items() if not name.startswith("lm_head.")}

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size

    metadata = {"format": "pt"}
    if len(shards) == 1:
        written = [SINGLE_FILE]
        with _atomic_path(directory / SINGLE_FILE) as tmp:
            save_file(shards[0], tmp, metadata=metadata)
    else:
        written = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for file, shard in zip(written, shards, strict=True):
            with _atomic_path(directory / file) as tmp:
                save_file(shard, tmp, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_text(directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(INDEX_FILE)

    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    quantization = quantization_config(model)
    if quantization is not None:
        config_dict["quantization_config"] = quantization
    float_dtype = next(t.dtype for t in state.values() if t.is_floating_point())  # int8 weights aside
    config_dict["torch_dtype"] = str(float_dtype).removeprefix("torch.")
    _write_text(directory / "config.json", json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    if generation_config is not None:
        _write_text(directory / "generation_config.json", json.dumps(generation_config, indent=2) + "\n")

    for stale in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        if stale.name not in written and stale.exists():
            stale.unlink()
    return directory


@contextmanager
def _atomic_path(target: Path) -> Iterator[str]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    tmp = str(target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # checkpoints are for sharing; safetensors creates its files private
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_text(target: Path, text: str) -> None:
    with _atomic_path(target) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
