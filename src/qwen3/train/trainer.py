"""The training loop: `train(TrainConfig)` pretrains, fine-tunes or LoRA-tunes a Qwen3 on text or chat data.

Batches. `batch_size` is the number of sequences in one micro-step summed over all processes, and one
optimizer step is `grad_accum` micro-steps, so a step always sees the same `batch_size * grad_accum`
blocks whatever the number of processes: global sample g of the run is block `SampleOrder[g]`, step s
(1-based) takes samples (s-1)*B*A ... s*B*A - 1, micro-step m the B of them from (s-1)*B*A + m*B, and
process r of W the r-th B/W of those. The loss of a step is (sum of nats over every learned target of the
step's blocks) / (number of those targets), so padding and chat masks weigh tokens, not sequences. Each
process backpropagates its share scaled by W / count; DDP and FSDP average gradients over processes, which
gives exactly the gradient of the global loss.

Numerics. On CUDA the forward runs under bf16 autocast with fp32 master weights and fp32 optimizer state
(the residual stream stays fp32, see model.py); on CPU everything is fp32. Weight decay applies to the
projection matrices (and LoRA matrices, and an untied lm_head), never to norms or the embedding. The
learning rate warms up linearly and decays on a cosine to `min_lr` (`lr_at`).

Parallelism goes through torch.distributed only: under torchrun (WORLD_SIZE > 1) the default is DDP;
`parallel="fsdp"` applies FSDP2's `fully_shard` to each decoder layer and to the root. gloo on CPU, nccl
on CUDA. Only rank 0 writes files; tokenization runs on rank 0 first and the others read its cache.

Checkpoints. `<out>/checkpoint-<step>/` holds the model in Hugging Face layout (config.json +
model.safetensors, which `qwen3.load_model` and transformers read; a LoRA run holds PEFT's
adapter_config.json + adapter_model.safetensors instead), the tokenizer files, `optimizer.pt` (the full
optimizer state keyed by parameter name, gathered to rank 0 under FSDP; loaded with weights_only=True),
`rng_state_rank<r>.safetensors` (CPU and CUDA generators of each process) and `training_state.json` (step,
data position, and the settings a resume must share). The folder is written under a temporary name and
renamed, then `<out>/last` names it. Because the data order, the learning rate and every random draw are
functions of the step and the saved state, a resumed run repeats the losses of an uninterrupted run
bit for bit (on CPU; CUDA kernels may be nondeterministic).

MFU counts 6 * (non-embedding parameters + the LM head's V * H) FLOPs per token for the matmuls (forward
and backward), plus 12 * layers * T * (heads * head_dim) for attention scores and values (PaLM's formula;
causal masking is not discounted), against `peak_tflops` per process.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import CheckpointError, load_model, save_model
from ..config import ConfigError, Qwen3Config
from ..device import DeviceError, resolve_device
from ..files import atomic_path, write_text_atomic
from ..hub import MODEL_FILES, TOKENIZER_FILES, ModelNotFoundError, resolve_source
from ..model import Qwen3ForCausalLM
from .data import (
    IGNORE_INDEX,
    Dataset,
    PackedBlocks,
    SampleOrder,
    TrainError,
    bits_per_byte,
    load_dataset,
    scored_bytes,
    tokenizer_fingerprint,
)
from .lora import (
    LORA_TARGETS,
    LoRAConfig,
    apply_lora,
    copy_tokenizer_files,
    load_adapter,
    lora_state_dict,
    save_adapter,
)
from .loss import CausalLMLoss

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.pt"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
LAST_FILE = "last"
STATE_FORMAT = 1
H100_CLASS_BF16_TFLOPS = 989.0  # dense bf16 peak of H100 / H200 SXM


@dataclass
class TrainConfig:
    """Every option of a training run; the CLI flags are these names with dashes."""

    out: str
    data: list[str]
    preset: str | None = None  # from scratch, e.g. "0.6B"
    config: str | None = None  # from scratch, a config.json
    model: str | None = None  # fine-tune a checkpoint (directory or Hub id)
    tokenizer: str | None = None  # defaults to `model`
    eval_data: list[str] = field(default_factory=list)
    eval_fraction: float = 0.0
    cache_dir: str | None = None  # defaults to <out>/cache
    block_size: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int | None = None  # None: min(100, max_steps // 10)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    seed: int = 0
    init_std: float = 0.02
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere), bf16, fp32
    device: str | None = None  # None or "auto": cuda:LOCAL_RANK if CUDA is available, else cpu
    parallel: str = "auto"  # auto, none, ddp, fsdp
    activation_checkpointing: bool = False
    compile: bool = False
    loss_chunk_size: int = 2048
    eval_every: int = 100
    eval_max_blocks: int = 0  # 0: the whole held-out set
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 0  # 0: keep all
    stop_after: int | None = None  # stop (with a checkpoint) after this step; the schedule still ends at max_steps
    resume: str | None = None  # "auto" for <out>/last, or a checkpoint directory
    overwrite: bool = False
    peak_tflops: float | None = None
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    progress: bool = True

    @property
    def warmup(self) -> int:
        return min(100, self.max_steps // 10) if self.warmup_steps is None else self.warmup_steps

    def validate(self) -> None:
        """Raise TrainError naming the first flag that is wrong."""
        sources = [name for name in ("preset", "config", "model") if getattr(self, name)]
        if len(sources) != 1:
            raise TrainError(f"give exactly one of --preset, --config, --model (found {len(sources)})")
        if not self.data:
            raise TrainError("--data: no data given")
        positive = ("block_size", "batch_size", "grad_accum", "max_steps", "loss_chunk_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TrainError(f"--{name.replace('_', '-')}: must be a positive integer, found {value!r}")
        for name in ("eval_every", "eval_max_blocks", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name.replace('_', '-')}: must be >= 0, found {getattr(self, name)}")
        if not (self.lr >= 0 and 0 <= self.min_lr <= self.lr):
            raise TrainError(f"--min-lr / --lr: need 0 <= min_lr <= lr, found {self.min_lr} and {self.lr}")
        if not 0 <= self.warmup < self.max_steps:
            raise TrainError(f"--warmup-steps: must be in [0, max_steps), found {self.warmup}")
        if not 0 <= self.eval_fraction < 1:
            raise TrainError(f"--eval-fraction: must be in [0, 1), found {self.eval_fraction}")
        if self.eval_fraction and self.eval_data:
            raise TrainError("--eval-fraction and --eval-data: give one or the other")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.init_std <= 0:
            raise TrainError("--weight-decay and --grad-clip must be >= 0 and --init-std > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.adam_eps > 0):
            raise TrainError(f"--beta1/--beta2/--adam-eps: found {self.beta1}, {self.beta2}, {self.adam_eps}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise TrainError(f"--precision: expected auto, bf16 or fp32, found {self.precision!r}")
        if self.parallel not in ("auto", "none", "ddp", "fsdp"):
            raise TrainError(f"--parallel: expected auto, none, ddp or fsdp, found {self.parallel!r}")
        if self.device not in (None, "auto"):
            try:
                device = resolve_device(self.device)  # a GPU this machine lacks: one line now, not a CUDA traceback
            except DeviceError as e:
                raise TrainError(f"--device: {str(e).removeprefix('device ')}") from e
            if device.type == "meta":
                raise TrainError("--device: 'meta' holds no data; train on cpu, cuda or mps")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.max_steps:
            raise TrainError(f"--stop-after: must be in [1, max_steps], found {self.stop_after}")
        if self.resume and self.overwrite:
            raise TrainError("--resume and --overwrite: give one or the other")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise TrainError(f"--peak-tflops: must be positive, found {self.peak_tflops}")
        if self.lora_rank < 0:
            raise TrainError(f"--lora-rank: must be >= 0, found {self.lora_rank}")
        if self.lora_rank and not self.model:
            raise TrainError("--lora-rank: LoRA adapts a pretrained model; give it with --model")
        if self.lora_rank:
            self.lora_config()  # validates alpha, dropout, targets

    def lora_config(self) -> LoRAConfig | None:
        if not self.lora_rank:
            return None
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path | None  # the last checkpoint written
    start_step: int  # the step this call resumed from (0 for a fresh run)
    step: int  # the last step run
    losses: list[float]  # training loss of each step this call ran, in order
    eval_metrics: dict[str, float] | None  # the last evaluation: eval_loss, eval_ppl, eval_bpb, eval_tokens


# ---------------------------------------------------------------------------------------------------
# Pure pieces: schedule, parameter groups, FLOPs
# ---------------------------------------------------------------------------------------------------


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): lr * (step + 1) / warmup during warmup, then
    min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2 with p = (step - warmup) / (max_steps - warmup - 1),
    so the last step (max_steps - 1) runs at exactly min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps - 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def weight_decay_names(module: nn.Module) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) names of trainable parameters: vectors (norm scales, biases) and the token
    embedding (with a tied lm_head, the same tensor) are not decayed; matrices are."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("embed_tokens.weight") else decay).append(name)
    return decay, no_decay


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups following `weight_decay_names`."""
    params = dict(module.named_parameters())
    decay, no_decay = weight_decay_names(module)
    groups = [{"params": [params[n] for n in decay], "weight_decay": weight_decay}]
    groups.append({"params": [params[n] for n in no_decay], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def flops_per_token(config: Qwen3Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): see the module docstring."""
    embedding = config.vocab_size * config.hidden_size
    per_layer = (
        config.hidden_size * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
        + 3 * config.hidden_size * config.intermediate_size
        + 2 * config.hidden_size
        + 2 * config.head_dim
    )
    matmul_params = config.num_hidden_layers * per_layer + config.hidden_size + embedding  # + final norm + LM head
    attention = 12 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6 * matmul_params + attention


def default_peak_tflops(device: torch.device) -> float | None:
    """989 (dense bf16) on H100/H200-class GPUs; None (MFU not reported) elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return H100_CLASS_BF16_TFLOPS if any(k in name for k in ("H100", "H200", "H800")) else None


# ---------------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------------


def build_loss_module(
    model: Qwen3ForCausalLM, chunk_size: int = 2048, activation_checkpointing: bool = False, compile: bool = False
) -> CausalLMLoss:
    """The module a training step calls: model + chunked loss, each decoder layer compiled if asked.

    Layers are compiled one by one (`nn.Module.compile`, in place, so parameter names do not change), as
    torchtitan does: one graph serves every layer, and FSDP's per-layer hooks stay outside the graphs."""
    if compile:
        for layer in model.model.layers:
            layer.compile()
    return CausalLMLoss(model, chunk_size, activation_checkpointing)


def train_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[Tensor, Tensor]],
    scored_tokens: int,
    *,
    world_size: int = 1,
    grad_clip: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward/backward every (inputs, targets) micro-batch of this process, clip, step the optimizer.

    `module(inputs, targets)` returns summed nats (a CausalLMLoss, maybe wrapped by DDP/FSDP/compile);
    `scored_tokens` counts the learned targets of the whole global batch. Returns the global mean loss and
    the gradient norm before clipping, as tensors."""
    device = micro_batches[0][0].device
    scale = world_size / max(scored_tokens, 1)
    total = torch.zeros((), device=device)
    for i, (inputs, targets) in enumerate(micro_batches):
        defer_sync = isinstance(module, DistributedDataParallel) and i < len(micro_batches) - 1
        with module.no_sync() if defer_sync else nullcontext():
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                nats = module(inputs, targets)
            (nats * scale).backward()
        total += nats.detach().float()
    params = [p for p in module.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world_size > 1:
        dist.all_reduce(total)
    return total / max(scored_tokens, 1), grad_norm


@torch.no_grad()
def evaluate(
    module: nn.Module,
    blocks: PackedBlocks,
    num_blocks: int,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """(total nats, scored targets) over the first `num_blocks` held-out blocks, summed over processes.

    Every process runs the same number of equal-shaped batches (short ones are padded with blocks that
    have no target), as FSDP's collectives require."""
    was_training = module.training
    module.eval()
    nats = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.int64)
    share = batch_size // world_size
    for start in range(0, num_blocks, batch_size):
        indices = list(range(start, min(start + batch_size, num_blocks)))
        indices += [-1] * (batch_size - len(indices))
        inputs, targets = blocks.batch(indices[rank * share : (rank + 1) * share])
        inputs, targets = inputs.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            nats += module(inputs, targets).double()
        count += (targets != IGNORE_INDEX).sum()
    if world_size > 1:
        dist.all_reduce(nats)
        dist.all_reduce(count)
    module.train(was_training)
    return nats.item(), int(count.item())


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------


@dataclass
class _World:
    rank: int
    size: int
    device: torch.device
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def main_first(self, fn: Any) -> Any:
        """Run `fn` on rank 0, then (if it did not raise TrainError) on the others; the same error everywhere."""
        if self.size == 1:
            return fn()
        message, result = [None], None
        if self.is_main:
            try:
                result = fn()
            except TrainError as e:
                message = [str(e)]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise TrainError(message[0])
        return fn() if not self.is_main else result


def _init_world(config: TrainConfig) -> _World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device not in (None, "auto"):
        device = torch.device(config.device)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)  # binds the rank to its GPU up front
        else:
            dist.init_process_group("gloo")
        owns = True
    if size > 1 and dist.get_world_size() != size:
        raise TrainError(f"WORLD_SIZE={size} but the process group has {dist.get_world_size()} processes")
    return _World(rank if size > 1 else 0, size, device, owns)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run as described by `config`; see the module docstring."""
    config.validate()
    world = _init_world(config)
    try:
        return _Run(config, world).run()
    finally:
        if world.owns_process_group:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, config: TrainConfig, world: _World) -> None:
        self.cfg, self.world = config, world
        self.out = Path(config.out)
        self.resume_state: dict[str, Any] = {}  # training_state.json of the checkpoint resumed, once read
        self.device = world.device
        self.lora = config.lora_config()
        if world.size > 1 and config.batch_size % world.size:
            raise TrainError(f"--batch-size: {config.batch_size} is not divisible by the {world.size} processes")
        parallel = config.parallel
        if parallel == "auto":
            parallel = "ddp" if world.size > 1 else "none"
        if parallel != "none" and world.size == 1:
            raise TrainError(f"--parallel {parallel}: needs several processes (launch with torchrun)")
        if parallel == "none" and world.size > 1:
            raise TrainError("--parallel none: launched with several processes; use ddp or fsdp")
        self.parallel = parallel
        precision = config.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.precision = precision

    # ---- setup ------------------------------------------------------------------------------------

    def _resume_dir(self) -> Path | None:
        cfg = self.cfg
        if not cfg.resume:
            if self.out.exists() and not self.out.is_dir():
                raise TrainError(f"--out: {self.out} is a file")
            held = sorted(p.name for p in self.out.iterdir() if p.name != "cache") if self.out.is_dir() else []
            if held and not cfg.overwrite:
                shown = ", ".join(held[:4]) + (" ..." if len(held) > 4 else "")
                raise TrainError(
                    f"--out: {self.out} already holds a run ({shown}); pass --resume to continue it "
                    f"or --overwrite to start over"
                )
            return None
        if cfg.resume == "auto":
            pointer = self.out / LAST_FILE
            if not pointer.is_file():
                raise TrainError(f"--resume: no checkpoint to resume in {self.out} (no '{LAST_FILE}' file)")
            try:
                directory = self.out / pointer.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise TrainError(f"--resume: cannot read {pointer} ({_one_line(e)})") from e
        else:
            directory = Path(cfg.resume)
        if not (directory / STATE_FILE).is_file():
            raise TrainError(f"--resume: {directory} is not a training checkpoint (no {STATE_FILE})")
        self.resume_state = read_training_state(directory)
        return directory

    def _signature(self, model_config: Qwen3Config, data: Dataset, tokenizer_hash: str) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        cfg = self.cfg
        keys = (
            "block_size",
            "batch_size",
            "grad_accum",
            "max_steps",
            "lr",
            "min_lr",
            "weight_decay",
            "beta1",
            "beta2",
            "adam_eps",
            "grad_clip",
            "seed",
            "eval_fraction",
        )
        signature = {k: getattr(cfg, k) for k in keys}
        signature.update(
            warmup_steps=cfg.warmup,
            init="pretrained" if cfg.model else f"scratch (std {cfg.init_std})",
            model_config=json.loads(model_config.to_json_string()),
            tokenizer=tokenizer_hash,
            data=data.fingerprint,
            precision=self.precision,
            lora=None if self.lora is None else self.lora.to_peft_dict(None),
        )
        return signature

    def _check_signature(self, saved: dict[str, Any], now: dict[str, Any], directory: Path) -> None:
        diffs = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if diffs:
            shown = "; ".join(
                f"{k}: {_short(saved.get(k))} in the checkpoint, {_short(now.get(k))} now" for k in diffs[:4]
            )
            raise TrainError(f"--resume: {directory} was written by a run with another configuration ({shown})")

    def _load_tokenizer(self) -> tuple[Any, str]:
        from ..tokenizer import load_tokenizer

        source = self.cfg.tokenizer or self.cfg.model
        if source is None:
            raise TrainError("--tokenizer: required when training from scratch (--preset or --config)")
        try:
            return load_tokenizer(source), tokenizer_fingerprint(source)
        except (OSError, ValueError) as e:  # ModelNotFoundError is an OSError; bad files raise ValueError
            raise TrainError(f"--tokenizer: {e}") from e

    def _model_config(self) -> Qwen3Config:
        cfg = self.cfg
        try:
            if cfg.preset:
                return Qwen3Config.from_preset(cfg.preset)
            if cfg.config:
                return Qwen3Config.from_json(cfg.config)
            return Qwen3Config.from_json(resolve_source(cfg.model, MODEL_FILES) / "config.json")
        except (ConfigError, ModelNotFoundError) as e:
            flag = "--preset" if cfg.preset else "--config" if cfg.config else "--model"
            raise TrainError(f"{flag}: {e}") from e

    def _build_model(self, model_config: Qwen3Config, resume_dir: Path | None) -> Qwen3ForCausalLM:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        try:
            if resume_dir is not None and self.lora is None:
                model = load_model(resume_dir, device="cpu", dtype=torch.float32)
            elif cfg.model:
                model = load_model(cfg.model, device="cpu", dtype=torch.float32)
            else:
                model = Qwen3ForCausalLM(model_config)
                model.init_weights(cfg.init_std)
        except (CheckpointError, ConfigError, ModelNotFoundError) as e:
            raise TrainError(f"{'--resume' if resume_dir and self.lora is None else '--model'}: {e}") from e
        if self.lora is not None:
            if resume_dir is not None:
                load_adapter(model, resume_dir)
            else:
                apply_lora(model, self.lora)
        return model.train()

    def _wrap(self, model: Qwen3ForCausalLM) -> tuple[CausalLMLoss, nn.Module]:
        cfg = self.cfg
        loss_module = build_loss_module(model, cfg.loss_chunk_size, cfg.activation_checkpointing, cfg.compile)
        if self.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world.size,))
            model.init_buffers(self.device)  # fully_shard moves (and shards) parameters; RoPE tables we move
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(loss_module, mesh=mesh)
            return loss_module, loss_module
        loss_module.to(self.device)
        if self.parallel == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return loss_module, DistributedDataParallel(loss_module, device_ids=ids)
        return loss_module, loss_module

    def _prepare_out(self) -> None:
        """Create <out>; with --overwrite, remove the previous run's outputs (never anything else)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.overwrite:
            for path in [*step_checkpoints(self.out), *self.out.glob(".checkpoint-*")]:
                if path.is_dir():
                    shutil.rmtree(path)
            for name in (LAST_FILE, METRICS_FILE, PLOT_FILE):
                (self.out / name).unlink(missing_ok=True)

    # ---- checkpoints ------------------------------------------------------------------------------

    def _save(self, step: int, signature: dict[str, Any]) -> Path:
        cfg, world = self.cfg, self.world
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.lora is not None)
        model_state = get_model_state_dict(self.loss_module, options=options)  # collective under FSDP
        optim_state = get_optimizer_state_dict(self.loss_module, self.optimizer, options=options)
        final = self.out / f"checkpoint-{step}"
        tmp = self.out / f".checkpoint-{step}.tmp"
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        world.barrier()
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        with atomic_path(tmp / f"rng_state_rank{world.rank}.safetensors") as rng_tmp:  # keeps the umask's mode
            save_file(rng, rng_tmp)
        world.barrier()
        if world.is_main:
            state = {name.removeprefix("model."): t for name, t in model_state.items()}
            if self.lora is not None:
                save_adapter(lora_state_dict(state), self.lora, tmp, base_model=cfg.model)
            else:
                with torch.device("meta"):
                    model = Qwen3ForCausalLM(self.model_config)
                model.load_state_dict(state, strict=True, assign=True)
                if self.model_config.tie_word_embeddings:
                    model.tie_weights()
                save_model(model, tmp)
            copy_tokenizer_files(self.tokenizer_dirs, tmp)
            torch.save(optim_state, tmp / OPTIMIZER_FILE)
            training_state = {
                "format": STATE_FORMAT,
                "step": step,
                "samples_seen": step * cfg.batch_size * cfg.grad_accum,
                "world_size": world.size,
                "parallel": self.parallel,
                "signature": signature,
            }
            write_text_atomic(tmp / STATE_FILE, json.dumps(training_state, indent=2) + "\n")
            if final.exists():  # re-saving a step (a resumed run that stopped at the same step)
                old = self.out / f".checkpoint-{step}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            write_text_atomic(self.out / LAST_FILE, final.name + "\n")
            if cfg.keep_checkpoints:
                for stale in step_checkpoints(self.out)[: -cfg.keep_checkpoints]:
                    shutil.rmtree(stale)
        world.barrier()
        return final

    def _restore(self, directory: Path) -> int:
        """Load optimizer and RNG states of a checkpoint (the weights were loaded with the model)."""
        optim_path = directory / OPTIMIZER_FILE
        try:
            optim_state = torch.load(optim_path, map_location="cpu", weights_only=True)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:  # weights_only: tensors only
            raise TrainError(f"--resume: {optim_path} is damaged, not an optimizer state ({_one_line(e)})") from e
        try:
            set_optimizer_state_dict(
                self.loss_module, self.optimizer, optim_state, options=StateDictOptions(full_state_dict=True)
            )
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise TrainError(f"--resume: {optim_path} does not match this model's parameters ({_one_line(e)})") from e
        rng_path = directory / f"rng_state_rank{self.world.rank}.safetensors"
        if rng_path.is_file():
            restore_rng_state(rng_path, self.device)
        else:
            warnings.warn(f"{rng_path} missing (resumed with another process count): random draws differ", stacklevel=2)
        return int(self.resume_state["step"])

    # ---- metrics ----------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.world.is_main:
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop records past the resumed step (a run that died after its last checkpoint logged them)."""
        path = self.out / METRICS_FILE
        if self.world.is_main and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
            write_text_atomic(path, "".join(kept))

    def _evaluate(self, step: int) -> dict[str, float]:
        nats, count = evaluate(
            self.module,
            self.eval_blocks,
            self.eval_num_blocks,
            self.cfg.batch_size,
            self.device,
            self.world.rank,
            self.world.size,
            self.autocast_dtype,
        )
        loss = nats / max(count, 1)
        metrics = {
            "eval_loss": loss,
            "eval_ppl": math.exp(min(loss, 700.0)),
            "eval_bpb": bits_per_byte(nats, self.eval_bytes),
            "eval_tokens": count,
        }
        self._log({"type": "eval", "step": step, **metrics})
        return metrics

    # ---- setup, then the loop ---------------------------------------------------------------------

    def run(self) -> TrainResult:
        start_step = self._setup()
        return self._loop(start_step)

    def _setup(self) -> int:
        """Check everything, then build data, model, optimizer; returns the step to continue from."""
        cfg, world = self.cfg, self.world
        resume_dir = self._resume_dir()
        world.barrier()  # every process has looked at <out> before rank 0 writes into it
        tokenizer, tokenizer_hash = self._load_tokenizer()
        self.model_config = self._model_config()
        if cfg.block_size > self.model_config.max_position_embeddings:
            raise TrainError(
                f"--block-size: {cfg.block_size} exceeds max_position_embeddings "
                f"({self.model_config.max_position_embeddings})"
            )
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out / "cache"
        data: Dataset = world.main_first(
            lambda: load_dataset(
                cfg.data,
                tokenizer,
                tokenizer_hash,
                cache_dir,
                cfg.block_size,
                cfg.eval_data,
                cfg.eval_fraction,
                show_progress=cfg.progress and world.is_main,
            )
        )
        if data.max_token_id >= self.model_config.vocab_size:
            raise TrainError(
                f"--tokenizer: the data has token id {data.max_token_id}, beyond the model's vocab_size "
                f"{self.model_config.vocab_size}"
            )
        self.signature = self._signature(self.model_config, data, tokenizer_hash)
        if resume_dir is not None:
            self._check_signature(self.resume_state["signature"], self.signature, resume_dir)

        model = self._build_model(self.model_config, resume_dir)
        self.loss_module, self.module = self._wrap(model)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.loss_module, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.adam_eps,
            fused=self.device.type == "cuda",
        )
        self.tokenizer_dirs = [resolve_source(cfg.tokenizer or cfg.model, TOKENIZER_FILES)]  # copied to checkpoints

        self.train_blocks = PackedBlocks(data.train, cfg.block_size)
        self.order = SampleOrder(len(self.train_blocks), cfg.seed)
        self.eval_blocks = PackedBlocks(data.eval, cfg.block_size) if data.eval is not None else None
        if self.eval_blocks is not None:
            n = len(self.eval_blocks)
            self.eval_num_blocks = min(n, cfg.eval_max_blocks) if cfg.eval_max_blocks else n
            if self.eval_blocks.scored(range(self.eval_num_blocks)) == 0:
                raise TrainError("held-out set: its blocks hold no learned token (no assistant turns in them)")
            self.eval_bytes = scored_bytes(
                self.eval_blocks, self.eval_num_blocks, lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
            )

        start_step = 0 if resume_dir is None else self._restore(resume_dir)
        if world.is_main:
            self._prepare_out()
            if resume_dir is not None:
                self._truncate_metrics(start_step)
        world.barrier()
        return start_step

    def _micro_batches(self, step: int) -> tuple[list[tuple[Tensor, Tensor]], int]:
        """This process's (inputs, targets) for each micro-step of `step`, and the step's scored targets."""
        B, A = self.cfg.batch_size, self.cfg.grad_accum
        share = B // self.world.size
        first = (step - 1) * B * A
        cuda = self.device.type == "cuda"
        micro_batches = []
        for m in range(A):
            begin = first + m * B + self.world.rank * share
            inputs, targets = self.train_blocks.batch([self.order[g] for g in range(begin, begin + share)])
            if cuda:
                inputs, targets = inputs.pin_memory(), targets.pin_memory()
            micro_batches.append(
                (inputs.to(self.device, non_blocking=cuda), targets.to(self.device, non_blocking=cuda))
            )
        scored = self.train_blocks.scored([self.order[g] for g in range(first, first + B * A)])
        return micro_batches, scored

    def _loop(self, start_step: int) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, world = self.cfg, self.world
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
        flops = flops_per_token(self.model_config, cfg.block_size)
        peak = cfg.peak_tflops or default_peak_tflops(self.device)
        last_step = cfg.stop_after or cfg.max_steps
        losses: list[float] = []
        eval_metrics = checkpoint = None
        if self.eval_blocks is not None and start_step == 0:
            eval_metrics = self._evaluate(0)

        bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", disable=not (cfg.progress and world.is_main))
        for step in range(start_step + 1, last_step + 1):
            started = time.perf_counter()
            lr = lr_at(step - 1, cfg.lr, cfg.min_lr, cfg.warmup, cfg.max_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            micro_batches, scored = self._micro_batches(step)
            loss_t, grad_norm_t = train_step(
                self.module,
                self.optimizer,
                micro_batches,
                scored,
                world_size=world.size,
                grad_clip=cfg.grad_clip,
                autocast_dtype=self.autocast_dtype,
            )
            loss, grad_norm = loss_t.item(), grad_norm_t.item()
            tokens_per_s = tokens_per_step / (time.perf_counter() - started)
            mfu = tokens_per_s * flops / (peak * 1e12 * world.size) if peak else None
            losses.append(loss)
            record = {"type": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
            self._log({**record, "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s, "mfu": mfu})
            postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
            if mfu is not None:
                postfix["mfu"] = f"{100 * mfu:.1f}%"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)

            if self.eval_blocks is not None and (
                (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps
            ):
                eval_metrics = self._evaluate(step)
                if world.is_main and cfg.progress:
                    bar.write(
                        f"step {step}: eval loss {eval_metrics['eval_loss']:.4f}, "
                        f"ppl {eval_metrics['eval_ppl']:.2f}, bpb {eval_metrics['eval_bpb']:.4f}"
                    )
            if (cfg.save_every and step % cfg.save_every == 0) or step == last_step:
                checkpoint = self._save(step, self.signature)
        bar.close()
        if world.is_main:
            plot_metrics(self.out / METRICS_FILE, self.out / PLOT_FILE)
        return TrainResult(self.out, checkpoint, start_step, max(start_step, last_step), losses, eval_metrics)


def read_training_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's training_state.json, checked; a TrainError naming the file if it is damaged."""
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"--resume: {path} is damaged, not readable JSON ({_one_line(e)})") from e
    if not isinstance(state, dict):
        raise TrainError(f"--resume: {path} is damaged: expected a JSON object, found {type(state).__name__}")
    if state.get("format") != STATE_FORMAT:
        raise TrainError(f"--resume: {path} has format {state.get('format')!r}; this version reads {STATE_FORMAT}")
    step, signature = state.get("step"), state.get("signature")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(signature, dict):
        raise TrainError(f"--resume: {path} is damaged: needs an integer 'step' >= 0 and a 'signature' object")
    return state


def restore_rng_state(path: Path, device: torch.device) -> None:
    """Set the CPU (and, on CUDA, the device's) generator from an rng_state_rank<r>.safetensors file."""
    try:
        rng = load_file(path)
        if "cpu" not in rng:
            raise KeyError("no 'cpu' tensor")
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    except (SafetensorError, OSError, KeyError, TypeError, RuntimeError) as e:
        why = e.args[0] if isinstance(e, KeyError) else _one_line(e)
        raise TrainError(f"--resume: {path} is damaged, not a random generator state ({why})") from e


def _one_line(error: BaseException) -> str:
    """An exception as one short line: its type when it has no message, its first line otherwise."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def step_checkpoints(out: Path) -> list[Path]:
    """The `checkpoint-<step>` folders in `out`, oldest step first; other names (`checkpoint-best`, a user's
    copy) are not the run's to prune."""
    steps = {}
    for path in out.iterdir():
        match = re.fullmatch(r"checkpoint-([1-9]\d*)", path.name)  # the names _save writes
        if match and path.is_dir():
            steps[int(match[1])] = path
    return [steps[s] for s in sorted(steps)]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Draw training (and held-out) loss against step from metrics.jsonl into a PNG; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss plot (pip install 'qwen3[train]')", stacklevel=2)
        return None
    train_steps, train_losses, eval_steps, eval_losses = [], [], [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("type") == "train":
            train_steps.append(record["step"])
            train_losses.append(record["loss"])
        elif record.get("type") == "eval":
            eval_steps.append(record["step"])
            eval_losses.append(record["eval_loss"])
    figure = Figure(figsize=(7, 4), dpi=120)  # the object API: no pyplot global state
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(train_steps, train_losses, label="train", linewidth=1)
    if eval_steps:
        axes.plot(eval_steps, eval_losses, "o-", label="held-out", markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats / token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png")
    return png_path


__all__ = [
    "TrainConfig",
    "TrainResult",
    "build_loss_module",
    "default_peak_tflops",
    "evaluate",
    "flops_per_token",
    "lr_at",
    "param_groups",
    "plot_metrics",
    "train",
    "train_step",
    "weight_decay_names",
]
