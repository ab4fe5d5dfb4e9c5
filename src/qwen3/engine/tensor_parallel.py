"""Tensor parallelism for the engine: `LLM(..., tensor_parallel_size=N)` runs one worker process per extra rank.

Rank 0 is the calling process: it runs the scheduler, the block manager and the sampler, exactly as in one process.
Ranks 1..N-1 are worker processes (torch.multiprocessing, spawn) that hold only their slice of the model
(parallel.load_model_tp: their query and KV heads, MLP features and vocabulary rows) and a KV pool of their own KV
heads, with as many blocks as rank 0's (the smallest any rank can hold; rank 0 decides and tells the others). The
collectives are inside the model (parallel.RowParallelLinear all-reduces, the LM head all-gathers), so every rank
runs the same forward on the same step metadata, and ends with the same logits; only rank 0 samples.

Per step rank 0 packs the metadata into one int32 tensor, a header then the payload:

    header   [op, N, S, width, S', decode, max_query_len, max_seq_len]
    payload  tokens (N) | positions (N) | slot_mapping (N) | block_tables (S x width) | seq_lens (S)
             | query_start_loc (S + 1) | logits_index (S')

and broadcasts it in two parts: the header over a CPU (gloo) group, then the payload over the model's group (NCCL
on CUDA, from the device: a token sampled last step and still in flight is written into it on rank 0's device, as
in one process). Why a separate header: a worker must know the payload's size before it can receive it, and it
waits for the next step without a deadline (a server may idle for hours) -- on the CPU, not spinning in an NCCL
kernel, and not under the model group's bounded timeout. No pickling per step.

CUDA graphs: every rank captures the same decode buckets at start, in the same order (the all-reduces are in the
graphs), and a decode step replays the same bucket on every rank from the same static buffers.

Failure: a watchdog thread on rank 0 polls the workers' exit codes; a dead worker makes the next step (or the one
in progress: gloo fails at once when a peer's socket closes; on NCCL the watchdog aborts the communicators so a
blocked wait returns) raise RuntimeError naming the worker, and the engine stays stopped. The model group's
collectives time out after MODEL_GROUP_TIMEOUT. A worker ends when rank 0 stops it (LLM.shutdown, garbage
collection, interpreter exit), when its control connection breaks, or when its parent process is gone; it leaves
by parallel.exit_worker (see there why).

Spawn starts a fresh interpreter that imports the caller's main module: a script must keep its top level under
`if __name__ == "__main__":`, as always with multiprocessing's spawn.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback
import weakref
from array import array
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from ..checkpoint import parse_dtype
from ..config import Qwen3Config
from ..model import Qwen3ForCausalLM
from ..parallel import exit_worker, load_model_tp, shard_config
from .attention import PagedAttention

if TYPE_CHECKING:
    from .llm import InFlight
    from .runner import ModelRunner

OP_STOP, OP_STEP = 0, 1
HEADER = 8  # ints: op, N, S, width, S', decode, max_query_len, max_seq_len
HOST = "127.0.0.1"
MODEL_GROUP_TIMEOUT = timedelta(minutes=5)  # a collective of the model (loading and capture included) waits this long
CONTROL_TIMEOUT = timedelta(days=365)  # a worker waits for the next step without a deadline
JOIN_TIMEOUT = 120.0  # seconds for the workers to start (import torch) and reach the rendezvous
WATCH_INTERVAL = 0.1  # seconds between the watchdog's looks at the workers
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its part of the engine (picklable, sent once at spawn)."""

    directory: str
    size: int
    device_type: str
    device_index: int  # rank r runs on cuda:(device_index + r)
    dtype: str
    threads: int
    max_num_seqs: int
    kv_cache_tokens: int | None
    gpu_memory_utilization: float
    enforce_eager: bool
    port: int
    parent_pid: int


def payload_size(header: list[int]) -> int:
    _, n, s, width, s_logits = header[:5]
    return 3 * n + s * width + s + (s + 1) + s_logits


# ---------------------------------------------------------------------------------------------------
# The packed step, and the forward every rank runs on it


def pack_step(runner: ModelRunner, data: tuple, holes: list[tuple[int, int]], in_flight: InFlight | None) -> Tensor:
    """Rank 0: the payload on the device (one pinned, non-blocking copy), with the tokens still in flight written
    in from the previous step's samples (on the device: the host has not seen them yet)."""
    tokens, positions, slots, tables, seq_lens, starts, logits_index = data
    packed = array("i", tokens)
    for part in (positions, slots, tables, seq_lens, starts, logits_index):
        packed.extend(part)
    payload = runner.to_device(packed)
    if holes:
        at = runner.to_device([i for i, _ in holes], torch.long)
        rows = runner.to_device([row for _, row in holes], torch.long)
        payload[at] = in_flight.next_ids[rows].to(torch.int32)
    return payload



def run_packed(runner: ModelRunner, header: list[int], payload: Tensor) -> Tensor:
    """One step's forward from its packed metadata (rank 0 and the workers alike): logits (S', V)."""
    _, n, s, width, s_logits, decode, max_query_len, max_seq_len = header
    cuts = [n, n, n, s * width, s, s + 1, s_logits]
    tokens, positions, slots, tables, seq_lens, starts, logits_index = payload.split(cuts)
    tables = tables.view(s, width)
    bucket = next((b for b in runner.graphs if b >= s), None) if decode else None
    if bucket is not None:  # the same bucket and static buffers on every rank
        runner.g_tokens[:s].copy_(tokens)
        runner.g_tokens[s:bucket].zero_()
        runner.g_positions[:s].copy_(positions)
        runner.g_positions[s:bucket].zero_()
        runner.g_slots[:s].copy_(slots)
        runner.g_slots[s:bucket].fill_(-1)
        runner.g_seq_lens[:s].copy_(seq_lens)
        runner.g_seq_lens[s:bucket].zero_()
        runner.g_tables[:s, :width].copy_(tables)
        runner.graphs[bucket].replay()
        return runner.model.lm_head(runner.g_hidden[:s])
    backend = PagedAttention(
        runner.pool, runner.kernels, slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
        query_start_loc=starts, max_query_len=max_query_len, max_seq_len=max_seq_len, decode=bool(decode),
        num_splits=runner._num_splits(s, max_seq_len) if decode else 1,
    )  # fmt: skip
    index = logits_index.long()[None]
    return runner.model(tokens.long()[None], positions.long()[None], backend, logits_index=index)[0]


# ---------------------------------------------------------------------------------------------------
# Rank 0


class TensorParallel:
    """Rank 0's side: the worker processes, the two process groups, the per-step broadcast, the watchdog."""

    def __init__(self, spec: WorkerSpec, device: torch.device, dtype: torch.dtype,
                 processes: list[mp.Process]) -> None:  # fmt: skip
        self.spec, self.size, self.device, self.dtype = spec, spec.size, device, dtype
        self.processes = processes
        self.control: dist.ProcessGroup | None = None
        self.dead: tuple[int, int, int] | None = None  # (rank, pid, exit code) of the first worker seen dead
        self.failed: str | None = None  # the error every later step raises
        self.closed = False
        self._finalizer = weakref.finalize(self, _release, processes)  # if shutdown never runs
        # The thread holds a weak reference: an LLM dropped without shutdown is collected, and its finalizer
        # stops the workers.
        self._watchdog = threading.Thread(target=_watch, args=(weakref.ref(self),), name="qwen3-tp-watchdog",
                                          daemon=True)  # fmt: skip

    @classmethod
    def start(cls, directory: Path, device: torch.device, dtype: torch.dtype, quantize: str | None,
              settings: dict) -> TensorParallel:  # fmt: skip
        """Check the split, spawn the workers, join both process groups (rank 0). Errors in the arguments are
        ValueErrors raised before any process starts."""
        size = settings["size"]
        raw = json.loads((directory / "config.json").read_text())
        shard_config(Qwen3Config.from_json(directory / "config.json"), size)  # ValueError naming the field
        if quantize == "int8" and not raw.get("quantization_config"):
            raise ValueError("LLM: quantize='int8' with tensor_parallel_size > 1 needs an int8 checkpoint "
                             "(write one with `qwen3 quantize`); quantizing after the split is not supported")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"LLM: tensor parallelism runs on cuda (nccl) or cpu (gloo), not {device.type!r}")
        base = (device.index or 0) if device.type == "cuda" else 0
        if device.type == "cuda" and torch.cuda.device_count() < base + size:
            raise ValueError(f"LLM: tensor_parallel_size={size} needs cuda:{base}..cuda:{base + size - 1}; "
                             f"{torch.cuda.device_count()} GPUs are visible")  # fmt: skip
        if dist.is_initialized():
            raise ValueError("LLM: tensor_parallel_size > 1 starts its own process group, and this process "
                             "already has one (torch.distributed is initialised)")
        if device.type == "cuda":
            device = torch.device("cuda", base)
            for name, value in NO_MULTICAST.items():  # NVLink multicast stays off (before NCCL starts)
                os.environ.setdefault(name, value)
        store = dist.TCPStore(HOST, 0, size, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=JOIN_TIMEOUT))  # fmt: skip
        spec = WorkerSpec(
            directory=str(directory), size=size, device_type=device.type, device_index=base,
            dtype=str(dtype).removeprefix("torch."), threads=max(1, (os.cpu_count() or 1) // size),
            max_num_seqs=settings["max_num_seqs"], kv_cache_tokens=settings["kv_cache_tokens"],
            gpu_memory_utilization=settings["gpu_memory_utilization"], enforce_eager=settings["enforce_eager"],
            port=store.port, parent_pid=os.getpid(),
        )  # fmt: skip
        context = mp.get_context("spawn")
        processes = [context.Process(target=worker_main, args=(rank, spec), name=f"qwen3-tp-rank{rank}", daemon=True)
                     for rank in range(1, size)]  # fmt: skip
        # The children's copy of the environment: their CPU threads, and no second "loading weights" bar.
        child_env = {"OMP_NUM_THREADS": str(spec.threads), "TQDM_DISABLE": "1"}
        saved = {name: os.environ.get(name) for name in child_env}
        os.environ.update(child_env)
        try:
            for process in processes:
                process.start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        tp = cls(spec, device, dtype, processes)
        tp._watchdog.start()
        try:
            tp._wait_for_workers(store)
            tp.control = join_groups(store, 0, size, device)
        except BaseException:
            tp.shutdown()
            raise
        tp._store = store
        return tp

    def _wait_for_workers(self, store: dist.TCPStore) -> None:
        """Wait until every worker has reached the rendezvous (or one died, or JOIN_TIMEOUT passed)."""
        keys = [f"arrived/{rank}" for rank in range(1, self.size)]
        deadline = time.monotonic() + JOIN_TIMEOUT
        while not store.check(keys):
            self._raise_if_dead()
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor parallelism: the workers did not start within {JOIN_TIMEOUT:.0f} s")
            time.sleep(0.02)

    def load_model(self) -> Qwen3ForCausalLM:
        """Rank 0's slice of the model (the workers load theirs at the same time)."""
        try:
            return load_model_tp(self.spec.directory, self.device, self.dtype)
        except BaseException:
            self.shutdown()
            raise

    # -------------------------------------------------------------------------------------------
    # Setup exchanges (over the control group, CPU)

    def _exchange(self, values: list[int], op: str = "broadcast") -> list[int]:
        try:
            return exchange(values, self.control, op)
        except RuntimeError as e:
            raise self._failure(e) from e

    def send_sizes(self, max_model_len: int, block_size: int, max_num_batched_tokens: int) -> None:
        """Tell the workers the sizes rank 0 resolved (their warm-up forward must match rank 0's)."""
        self._exchange([max_model_len, block_size, max_num_batched_tokens])

    def agree(self, num_blocks: int) -> int:
        """The smallest number of blocks any rank can hold (each proposed its own); every rank gets it."""
        return self._exchange([num_blocks], op="min")[0]

    # -------------------------------------------------------------------------------------------
    # Steps

    @staticmethod
    def header(n: int, s: int, width: int, s_logits: int, decode: bool, max_query_len: int,
               max_seq_len: int) -> list[int]:  # fmt: skip
        return [OP_STEP, n, s, width, s_logits, int(decode), max_query_len, max_seq_len]

    def step(self, runner: ModelRunner, header: list[int], data: tuple, holes: list[tuple[int, int]],
             in_flight: InFlight | None) -> Tensor:  # fmt: skip
        """Broadcast one step's metadata and run the forward here (the workers run it too): logits (S', V)."""
        self.check()
        payload = pack_step(runner, data, holes, in_flight)
        try:
            dist.broadcast(torch.tensor(header, dtype=torch.int32), 0, group=self.control)
            dist.broadcast(payload, 0)
            return run_packed(runner, header, payload)
        except RuntimeError as e:
            raise self._failure(e) from e

    # -------------------------------------------------------------------------------------------
    # Liveness

    def check(self) -> None:
        """Raise RuntimeError if the engine has stopped (a worker died)."""
        if self.failed is None and self.dead is not None:
            self._fail(self._dead_message())
        if self.failed is not None:
            raise RuntimeError(self.failed)
        if self.closed:
            raise RuntimeError("tensor parallelism: this engine was shut down (LLM.shutdown); build a new LLM")

    def _raise_if_dead(self) -> None:
        if self.dead is not None:
            raise RuntimeError(self._dead_message())

    def _dead_message(self) -> str:
        rank, pid, code = self.dead
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return (f"tensor-parallel worker rank {rank} (pid {pid}) {how}; the engine has stopped "
                f"(its error, if any, is printed above)")  # fmt: skip

    def _failure(self, error: BaseException) -> RuntimeError:
        """The error to raise after a collective failed: name the dead worker (waiting a little for its exit code
        to show), or say what failed; the engine stops either way."""
        deadline = time.monotonic() + 5.0
        while self.dead is None and time.monotonic() < deadline and not self.closed:
            time.sleep(0.02)
        message = self._dead_message() if self.dead is not None else (
            f"tensor-parallel step failed ({str(error).splitlines()[0][:200]}); the engine has stopped")  # fmt: skip
        self._fail(message)
        return RuntimeError(message)

    def _fail(self, message: str) -> None:
        if self.failed is None:
            self.failed = message
            self.shutdown()

    def _look(self) -> bool:
        """The watchdog's look at the workers: note the first that is gone (True); on NCCL, abort the
        communicators so that a wait on the device (a collective whose peer is dead) returns."""
        for rank, process in enumerate(self.processes, start=1):
            code = process.exitcode
            if code is not None:
                if not self.closed:
                    self.dead = (rank, process.pid, code)
                    if self.device.type == "cuda" and dist.is_initialized():
                        try:
                            dist.distributed_c10d._abort_process_group()
                        except Exception:  # noqa: BLE001 (best effort: the main thread raises regardless)
                            pass
                return True
        return False

    # -------------------------------------------------------------------------------------------
    # Shutdown

    def shutdown(self) -> None:
        """Stop the workers (a STOP header if they can still hear it), wait for them, leave the process groups."""
        if self.closed:
            return
        healthy = self.failed is None and self.dead is None and self.control is not None
        self.closed = True
        if healthy:
            try:
                dist.broadcast(torch.tensor([OP_STOP] + [0] * (HEADER - 1), dtype=torch.int32), 0, group=self.control)
            except RuntimeError:
                healthy = False
        if dist.is_initialized():  # before waiting for the workers: they leave their groups at the same time
            if healthy or self.device.type != "cuda":
                dist.destroy_process_group()
            else:  # NCCL with a dead peer: destroying could wait on it
                try:
                    dist.distributed_c10d._abort_process_group()
                except Exception:  # noqa: BLE001
                    pass
        _stop_processes(self.processes, grace=10.0 if healthy else 0.0)
        self._finalizer.detach()


def _watch(ref: weakref.ref[TensorParallel]) -> None:
    """The watchdog thread's loop, until the engine is closed, collected, or a worker is gone."""
    while True:
        tp = ref()
        if tp is None or tp.closed or tp._look():
            return
        del tp
        time.sleep(WATCH_INTERVAL)


def _release(processes: list[mp.Process]) -> None:
    """An engine collected (or the interpreter exiting) without shutdown: stop the workers, leave the groups."""
    _stop_processes(processes)
    if dist.is_initialized():
        dist.destroy_process_group()


def _stop_processes(processes: list[mp.Process], grace: float = 0.0) -> None:
    """Wait up to `grace` seconds for the workers to exit, then SIGTERM, then SIGKILL the ones left."""
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        alive = [p for p in processes if p.exitcode is None]
        if not alive:
            break
        for process in alive:
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass
        for process in alive:
            process.join(wait)


# ---------------------------------------------------------------------------------------------------
# Both sides


def join_groups(store: dist.TCPStore, rank: int, size: int, device: torch.device) -> dist.ProcessGroup:
    """Join the model's group (the default one: NCCL on CUDA, gloo on the CPU; bounded timeout) and return the
    control group (gloo, CPU, no deadline)."""
    if device.type == "cuda":
        dist.init_process_group("nccl", store=store, rank=rank, world_size=size, timeout=MODEL_GROUP_TIMEOUT,
                                device_id=device)  # fmt: skip
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=MODEL_GROUP_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def exchange(values: list[int], group: dist.ProcessGroup, op: str = "broadcast") -> list[int]:
    """Rank 0's values on every rank ("broadcast"), or the element-wise minimum over the ranks ("min")."""
    t = torch.tensor(values, dtype=torch.int64)
    if op == "min":
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    else:
        dist.broadcast(t, 0, group=group)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------
# The workers


def _watch_parent(parent_pid: int) -> None:
    """End this worker when rank 0's process is gone (an NCCL peer would otherwise wait for it forever)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="qwen3-tp-parent", daemon=True).start()


def worker_main(rank: int, spec: WorkerSpec) -> None:
    """A worker process: load this rank's slice, build the KV pool and runner like rank 0, then run every step
    rank 0 broadcasts until it says stop."""
    from tqdm import tqdm

    from .attention import KVPool, kernels_for
    from .config import EngineConfig
    from .llm import propose_num_blocks
    from .runner import ModelRunner

    torch.set_num_threads(spec.threads)
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock: exit_worker would leak its semaphore
    _watch_parent(spec.parent_pid)
    code = 0
    try:
        if spec.device_type == "cuda":
            device = torch.device("cuda", spec.device_index + rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        store = dist.TCPStore(HOST, spec.port, spec.size, is_master=False, timeout=timedelta(seconds=JOIN_TIMEOUT))
        store.set(f"arrived/{rank}", "1")
        control = join_groups(store, rank, spec.size, device)
        with torch.inference_mode():
            model = load_model_tp(spec.directory, device, parse_dtype(spec.dtype))
            max_model_len, block_size, max_num_batched_tokens = exchange([0, 0, 0], control)
            proposal = propose_num_blocks(model, spec.kv_cache_tokens, block_size, spec.max_num_seqs, max_model_len,
                                          max_num_batched_tokens, spec.gpu_memory_utilization, spec.size)  # fmt: skip
            num_blocks = exchange([proposal], control, op="min")[0]
            if num_blocks < 1:
                exit_worker(1)  # rank 0 raises the ValueError
            config = model.config
            engine_config = EngineConfig(
                device=device, dtype=model.model.norm.weight.dtype, max_num_seqs=spec.max_num_seqs,
                max_model_len=min(max_model_len, num_blocks * block_size),
                max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, num_blocks=num_blocks,
                enable_prefix_caching=False, enforce_eager=spec.enforce_eager, vocab_size=config.vocab_size,
                eos_token_ids=(),
            )  # fmt: skip
            pool = KVPool(config.num_hidden_layers, num_blocks, block_size, model.num_kv_heads, config.head_dim,
                          engine_config.dtype, device)  # fmt: skip
            runner = ModelRunner(model, engine_config, pool, kernels_for(device))  # captures graphs with rank 0
            serve(runner, control, device)
    except BaseException:  # noqa: BLE001 (reported, then the process ends; rank 0 names this worker)
        traceback.print_exc()
        code = 1
    exit_worker(code)


def serve(runner: ModelRunner, control: dist.ProcessGroup, device: torch.device) -> None:
    """The worker's step loop: receive a header (CPU), then the payload (the model's group), run the forward."""
    header_buffer = torch.empty(HEADER, dtype=torch.int32)
    while True:
        dist.broadcast(header_buffer, 0, group=control)
        header = header_buffer.tolist()
        if header[0] == OP_STOP:
            return
        payload = torch.empty(payload_size(header), dtype=torch.int32, device=device)
        dist.broadcast(payload, 0)
        run_packed(runner, header, payload)
