"""Tensor parallelism for inference (Megatron-LM's layout): every process (rank) holds a slice of each large
matrix, and the same model code runs on every rank, on its slices.

The plan, for tp ranks (TP_PLAN below, plus the LM head); rank r owns:
- qkv_proj (q, k, v fused: model.FUSED_PROJECTIONS), column-parallel, split by heads: the rows of query heads
  [r nh/tp, (r+1) nh/tp), then of KV heads [r nkv/tp, (r+1) nkv/tp) of k, then of v; that is, the concatenation
  of each part's own column-parallel block, which is how it is read from the checkpoint (the parts are separate
  tensors there). Query head h reads KV head h // (nh/nkv), so the rank's query heads read exactly the rank's
  KV heads: attention runs on whole heads with no communication, and the KV cache holds only the rank's KV
  heads (`KVCache.for_model` reads their number off the qkv projection).
- o_proj, row-parallel: the columns that multiply its heads' outputs. Its product is a partial sum of the
  attention output; one all-reduce completes it.
- gate_up_proj column-parallel (the rank's I/tp gate rows, then the same up rows) and down_proj row-parallel:
  SwiGLU is elementwise over the I features, so each rank computes its I/tp features whole; one all-reduce
  after down_proj.
- lm_head, vocabulary-parallel: the rows of tokens [r V/tp, (r+1) V/tp); an all-gather along the vocabulary
  gives every rank the full logits. Why not replicated: a decode step reads every weight once, and a
  replicated head (V x H, 1.2 GB in bf16 for Qwen3-8B) would add (1 - 1/tp) V H to every rank's reads per
  token (8% more at TP=2, 58% at TP=8 for 8B) and to its memory, where the all-gather moves B x V logits
  (300 KB a row in bf16). The cost: V must divide by tp (151936 = 2^7 x 1187 does, up to 128).
- embed_tokens, the norms and the RoPE tables, replicated: a lookup reads only B rows. A tied model's
  head shard is a view of the replicated embedding's rows: tied weights cost no extra memory here either.
So a decoder layer costs two all-reduces of (B, T, H), and a forward one all-gather of the logits.

Communication is torch.distributed's collectives, called where the sums are split: `all_reduce` in
RowParallelLinear, `all_gather` in VocabParallelLinear. torch.compile traces both into one graph (dynamo turns
them into functional collectives; tested), so the fast decode step (generate.DecodeStep) takes a TP model.
Measured on the 2-core CPU with gloo, 2 ranks, 8 layers of hidden 512, batch 1 (numbers from a scratch run):
- against DTensor's `parallelize_module` with the same plan (ColwiseParallel / RowwiseParallel): the same
  tokens, but 104 ms per decode step against 28 ms here. Every op on a DTensor weight goes through sharding
  propagation in Python, per op and per layer; here each rank's layers are plain nn.Linear on local tensors
  and the only added work is the collectives (a gloo collective alone costs ~1 ms on that machine).
- against the functional collectives (`_functional_collectives.all_reduce`): 116 against 158 us per call
  in eager, on a one-rank group (their result is a wrapper tensor that waits when first used).
- `all_gather` into a list, not `all_gather_into_tensor`: the latter fails under autograd with gloo.

Every rank ends with the same numbers (on identical devices): an all-reduce hands each rank the same sum and
the all-gather the same logits, and the replicated parts compute the same function of the same inputs. So a
sampler seeded alike draws the same token on every rank (tested), without communicating to agree on it.

Loading (`load_model_tp`): the model is built on the meta device, the plan swaps its linear layers for
local-shaped ones, and each rank reads only its slices from the safetensors files (`get_slice`, over mmap:
the other ranks' bytes are never read into this process), through checkpoint.read_checkpoint, the reader
`load_model` uses (same checks and errors). Replicated tensors are read whole. An int8 checkpoint
(qwen3.quantize) splits the same way: weight row j is scaled by weight_scale[j], so a column-parallel layer
(and the vocab-parallel head) takes the rows of both; a row-parallel layer takes the columns of the weight and
all of its scales (its output rows are whole on every rank).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import NamedTuple, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import (
    Index,
    Slicer,
    build_meta_model,
    fuse_state,
    fused_parts,
    parse_dtype,
    read_checkpoint,
    unfuse_state,
)
from .config import Qwen3Config
from .device import resolve_device
from .hub import MODEL_FILES, resolve_source
from .model import FUSED_PROJECTIONS, Qwen3ForCausalLM
from .quantize import Int8Linear, tied_lm_head

# How each linear layer of a decoder layer is split: "colwise" splits the weight's rows (output features),
# "rowwise" its columns (input features) and all-reduces the output. Everything not listed is replicated.
# A fused projection's parts (separate tensors in the checkpoint) are each split like it (CHECKPOINT_PLAN).
TP_PLAN: dict[str, str] = {
    "self_attn.qkv_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}
CHECKPOINT_PLAN: dict[str, str] = {
    part: style for path, style in TP_PLAN.items() for part in FUSED_PROJECTIONS.get(path, (path,))
}
LM_HEAD = "lm_head"  # vocabulary-parallel: split like "colwise", then all-gathered
SPLIT_DIM = {"colwise": 0, "rowwise": 1, "vocab": 0}  # the weight dimension each style splits

Value = TypeVar("Value")


class World(NamedTuple):
    """This process's place in the process group."""

    rank: int
    world_size: int
    device: torch.device


def init_distributed(device_type: str | None = None, timeout: timedelta | None = None) -> World:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    nccl on CUDA, with this rank on cuda:LOCAL_RANK; gloo on the CPU. `device_type` None picks cuda when
    there is one. `timeout` (default: torch's) bounds how long a collective may wait for the other ranks.
    A group that is already initialised is used as it is.
    """
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_distributed: {', '.join(missing)} not set; start the processes with "
            "torchrun --nproc-per-node N (python -m torch.distributed.run)"
        )
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device_type == "cpu":
        device = torch.device("cpu")
    else:
        raise ValueError(f"device: tensor parallelism runs on cuda (nccl) or cpu (gloo), not {device_type!r}")
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, timeout=timeout)  # binds the rank to its GPU
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return World(dist.get_rank(), dist.get_world_size(), device)


def on_rank0(fn: Callable[[], Value]) -> Value:
    """fn() run on rank 0 only, and its value (or the exception it raised) handed to every rank: for input that
    only rank 0 reads, such as standard input, so that all ranks take the same next step. Outside a process
    group, just fn()."""
    if not dist.is_initialized():
        return fn()
    message: list = [None, None]  # [value, exception]
    if dist.get_rank() == 0:
        try:
            message[0] = fn()
        except BaseException as e:  # EOFError, KeyboardInterrupt included: every rank raises it below
            message[1] = e
    dist.broadcast_object_list(message, src=0)
    if message[1] is not None:
        raise message[1]
    return message[0]


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker process now, with exit status `code`: destroy the process group (if still up),
    flush stdout and stderr, and leave by os._exit, skipping the interpreter's teardown.

    Why: torch keeps references to the default process group past destroy_process_group (a lazy import made by
    the first module built on the meta device holds ten), so its C++ object would be freed during that teardown,
    while gloo's threads still call into Python; the process then aborts now and then ("terminate called
    without an active exception": about 1 run in 10 of `qwen3 generate --tp 2` on a 2-core CPU, and 1 in 3 for
    a script that keeps its own reference to the group). Every file this project writes is closed by then."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def finish(code: int) -> int:
    """`code`, for a command's main() to return; in a torchrun worker (LOCAL_RANK set) the process ends here
    instead, by exit_worker(code)."""
    if "LOCAL_RANK" in os.environ:
        exit_worker(code)
    return code


def shard_config(config: Qwen3Config, world_size: int) -> Qwen3Config:
    """The per-rank view of `config` under `world_size`-way tensor parallelism: nh/tp query heads, nkv/tp
    KV heads and I/tp MLP features (what the rank's layers and KV cache hold).

    vocab_size stays whole (every rank ends with the full logits), but it must divide too: the LM head is
    split by vocabulary. Raises ValueError naming the field that does not divide.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"tensor-parallel size: must be a positive integer, found {world_size!r}")
    what = {
        "num_attention_heads": "each rank owns whole query heads",
        "num_key_value_heads": "each rank owns whole KV heads",
        "intermediate_size": "each rank owns whole MLP features",
        "vocab_size": "the LM head is split by vocabulary",
    }
    for name, why in what.items():
        value = getattr(config, name)
        if value % world_size:
            raise ValueError(f"{name}: {value} is not divisible by the tensor-parallel size {world_size} ({why})")
    return dataclasses.replace(
        config,
        num_attention_heads=config.num_attention_heads // world_size,
        num_key_value_heads=config.num_key_value_heads // world_size,
        intermediate_size=config.intermediate_size // world_size,
    )


# ---------------------------------------------------------------------------------------------------
# The parallel layers: nn.Linear on this rank's slice, plus the one collective each needs
# ---------------------------------------------------------------------------------------------------


class _AllReduceOutput(nn.Module):
    """Row parallelism over a local linear layer (float or int8, the next class in the MRO): y = sum over ranks
    of x_r W_r^T. The rank holds in_features/tp columns of W and receives the matching features of x (a
    column-parallel layer's output); one all-reduce completes the sum on every rank."""

    group: dist.ProcessGroup

    def forward(self, x: Tensor) -> Tensor:
        partial = super().forward(x)  # (..., out): this rank's share of the sum
        dist.all_reduce(partial, group=self.group)
        return partial


class _AllGatherVocab(nn.Module):
    """Vocabulary parallelism over a local linear layer (float or int8), for the LM head: the rank holds V/tp
    rows (tokens) of W, computes those logits, and an all-gather along the vocabulary gives every rank all of
    them: (..., V/tp) -> (..., V)."""

    group: dist.ProcessGroup

    def forward(self, x: Tensor) -> Tensor:
        local = super().forward(x)  # (..., V/tp)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)  # parts[r]: rank r's logits, tokens [r V/tp, (r+1) V/tp)
        return torch.cat(parts, dim=-1)  # (..., V)


class _GroupLinear(nn.Linear):
    """A bias-free Linear holding one rank's block of a matrix, and the process group that completes it."""

    def __init__(
        self, in_features: int, out_features: int, group: dist.ProcessGroup, device: torch.device | str | None = None
    ) -> None:
        super().__init__(in_features, out_features, bias=False, device=device)
        self.group = group


class _GroupInt8Linear(Int8Linear):
    """An Int8Linear holding one rank's block of a quantized matrix (and its scales), and its process group."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: dist.ProcessGroup,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        self.group = group


class RowParallelLinear(_AllReduceOutput, _GroupLinear):
    """A row-parallel nn.Linear (see _AllReduceOutput)."""


class VocabParallelLinear(_AllGatherVocab, _GroupLinear):
    """A vocabulary-parallel nn.Linear LM head (see _AllGatherVocab)."""


class Int8RowParallelLinear(_AllReduceOutput, _GroupInt8Linear):
    """A row-parallel Int8Linear: the rank's columns of the int8 weight, all of its per-row scales."""


class Int8VocabParallelLinear(_AllGatherVocab, _GroupInt8Linear):
    """A vocabulary-parallel Int8Linear LM head: the rank's rows of the int8 weight and of its scales."""


def _apply_tp_plan(model: Qwen3ForCausalLM, group: dist.ProcessGroup) -> None:
    """Swap the linear layers (float or int8) of a meta-device model for this rank's local-shaped ones (TP_PLAN)."""
    tp = dist.get_world_size(group)

    def local(full: nn.Module, style: str) -> nn.Module:
        int8 = isinstance(full, Int8Linear)
        out_features = full.out_features // tp if style in ("colwise", "vocab") else full.out_features
        in_features = full.in_features // tp if style == "rowwise" else full.in_features
        if style == "colwise":
            if int8:
                return Int8Linear(in_features, out_features, device="meta", dtype=full.weight_scale.dtype)
            return nn.Linear(in_features, out_features, bias=False, device="meta")
        if int8:
            cls = Int8RowParallelLinear if style == "rowwise" else Int8VocabParallelLinear
            return cls(in_features, out_features, group, device="meta", dtype=full.weight_scale.dtype)
        cls = RowParallelLinear if style == "rowwise" else VocabParallelLinear
        return cls(in_features, out_features, group, device="meta")

    for layer in model.model.layers:
        for path, style in TP_PLAN.items():
            parent_path, _, name = path.rpartition(".")
            setattr(layer.get_submodule(parent_path), name, local(layer.get_submodule(path), style))
    # A tied head (float, or int8 sharing the int8 embedding) gets its own local module: its rows are then
    # views of the replicated embedding's rows (read_checkpoint slices them from the embedding).
    model.lm_head = local(model.lm_head, "vocab")


def split_style(name: str) -> str | None:
    """How the checkpoint tensor `name` (a weight, or an int8 weight's scales, under Hugging Face's names) is
    split across ranks: "colwise", "rowwise", "vocab" or None (replicated)."""
    module = name.removesuffix(".weight").removesuffix(".weight_scale")
    if module == LM_HEAD:
        return "vocab"
    for path, style in CHECKPOINT_PLAN.items():
        if module.startswith("model.layers.") and module.endswith("." + path):
            return style
    return None


def shard_range(size: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous block of `size` rows (or columns): [rank size/tp, (rank+1) size/tp)."""
    step = size // world_size
    return slice(rank * step, (rank + 1) * step)


def rank_slicer(rank: int, world_size: int) -> Slicer:
    """The part of each checkpoint tensor rank `rank` reads (checkpoint.read_checkpoint's slicer): its block
    along the dimension split_style names, or all of it. A weight_scale (int8: one scale per weight row) is
    split like its weight's rows: a block for colwise and vocab, whole for rowwise (its rows are whole)."""

    def slicer(name: str, shape: tuple[int, ...]) -> Index:
        style = split_style(name)
        if style is None or SPLIT_DIM[style] >= len(shape):  # replicated, or a row-parallel layer's scales
            return None
        dim = SPLIT_DIM[style]
        return (slice(None),) * dim + (shard_range(shape[dim], rank, world_size),)

    return slicer


# ---------------------------------------------------------------------------------------------------
# Loading: each rank reads only its slices
# ---------------------------------------------------------------------------------------------------


def load_model_tp(
    source: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    group: dist.ProcessGroup | None = None,
    attention: str = "sdpa",
) -> Qwen3ForCausalLM:
    """Load this rank's part of a Qwen3 checkpoint (float or int8) for tensor-parallel inference over `group`
    (default: all processes). Call it on every rank of the group; the model then runs (forward,
    qwen3.generate) only when every rank of the group runs it with the same inputs."""
    if not dist.is_initialized():
        raise RuntimeError("load_model_tp: no process group; call init_distributed() first (under torchrun)")
    device, dtype = resolve_device(device), parse_dtype(dtype)
    group = group if group is not None else dist.group.WORLD
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    directory = resolve_source(source, MODEL_FILES)
    config = Qwen3Config.from_json(directory / "config.json")
    shard_config(config, tp)  # the divisibility checks, before anything is read
    model = build_meta_model(config, attention)
    parts = fused_parts(model)
    # the files' names and shapes
    expected = unfuse_state({name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}, parts)
    tied = tied_lm_head(model)
    _apply_tp_plan(model, group)
    local_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = read_checkpoint(directory, expected, tied, device, dtype, slicer=rank_slicer(rank, tp))
    state = fuse_state(state, parts)  # each fused tensor: the concatenation of its parts' rank blocks
    for name, tensor in state.items():  # the plan and the slicing must agree; a mismatch is a bug here
        assert tuple(tensor.shape) == local_shapes[name], (name, tuple(tensor.shape), local_shapes[name])
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Orchestration: a command restarts itself under torchrun, and each worker joins the group
# ---------------------------------------------------------------------------------------------------


def launch_tensor_parallel(source: str | os.PathLike, tp: int, argv: list[str], module: str = "qwen3.cli") -> int:
    """Run `python -m module *argv` in `tp` processes under torchrun and return its exit status; each process
    then loads its slice of the model. The model is resolved (downloaded) once, here, and the split checked
    against its config, before any process starts. Ctrl-C reaches torchrun, which stops the workers."""
    import subprocess

    from .hub import TOKENIZER_FILES

    directory = resolve_source(source, sorted(set(MODEL_FILES + TOKENIZER_FILES)))
    shard_config(Qwen3Config.from_json(directory / "config.json"), tp)  # fail before starting processes
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // tp)), **os.environ}  # CPU threads per rank
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
               "-m", module, *argv]  # fmt: skip
    process = subprocess.Popen(command, env=env)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # torchrun got the same Ctrl-C and is stopping the workers: let it finish
            continue


def join_tensor_parallel(tp: int, device: str = "auto") -> torch.device:
    """Under torchrun: join the process group of `tp` processes and return this rank's device (cuda:LOCAL_RANK,
    or the CPU). Unseeded sampling then draws alike on every rank (each starts in rank 0's RNG state)."""
    device_type = None if device == "auto" else torch.device(device).type
    # A long timeout: in chat the other ranks wait in a broadcast while rank 0 waits for a person to type.
    world = init_distributed(device_type, timeout=timedelta(hours=24))
    if world.world_size != tp:
        raise ValueError(f"tp: {tp} processes expected, torchrun started {world.world_size}")
    torch.manual_seed(on_rank0(torch.initial_seed))
    return world.device
