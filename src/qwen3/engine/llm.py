"""qwen3.LLM: many prompts through one engine; the step loop that ties scheduler, runner and sampler together.

A step: the scheduler picks this step's sequences and token counts (scheduler.py), the runner runs one packed
forward (runner.py), every sequence's computed-token count advances and its newly full blocks enter the prefix
cache (block_manager.py), and the sequences whose forward reached their last token get one sampled token each
(sampler.py). A sequence finishes on EOS (unless ignore_eos), a stop token id, a stop string (text.py), its
max_tokens, or max_model_len; its blocks are freed at once. The host runs one step ahead of the sampled ids
(see LLM.step and docs/engine.md): step n + 1 is launched before step n's tokens are read back.

Sizing (CUDA): after the weights are loaded, one forward of max_num_batched_tokens tokens and a sampler pass over
max_num_seqs rows measure the peak activation memory; the pool gets what is left of gpu_memory_utilization x
total memory (nano-vllm's rule), unless kv_cache_tokens fixes it. CPU: max_num_seqs x max_model_len tokens,
capped at a quarter of the available RAM.
"""

from __future__ import annotations

import itertools
import numbers
import os
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model import CausalAttention, Qwen3ForCausalLM
from ..sampling import SamplingParams
from ..text import TextStream
from ..tokenizer import Tokenizer
from .attention import KVPool, kernels_for
from .block_manager import BlockManager
from .config import EngineConfig
from .runner import ModelRunner
from .sampler import Sampler, logprobs_for_row
from .scheduler import Scheduler
from .sequence import Sequence, Status, TokenLogprob

DEFAULT_BLOCK_SIZE = {"cuda": 16, "cpu": 16}  # vLLM's 16; CUDA: chosen by measurement pending (the lead, H200)
DEFAULT_BATCHED_TOKENS = {"cuda": 16384, "cpu": 2048}
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}  # "auto": the model's dtype; fp8 halves the bytes
CPU_RAM_SHARE = 0.25  # the CPU pool's default takes at most this share of the available memory
PENDING = -1  # the placeholder of a sampled token that has not reached the host yet


@dataclass
class InFlight:
    """A step's sampled tokens on their way to the host."""

    seqs: list[Sequence]
    rows: dict[Sequence, int]  # row of each sequence in next_ids
    next_ids: torch.Tensor  # (S,) on the device: the next step's input tokens are read from here
    host: list[torch.Tensor]  # ids, and the logprob tensors when asked for, on the host (pinned on CUDA)
    event: torch.cuda.Event | None  # the copy's completion (CUDA)


@dataclass
class RequestOutput:
    """A finished request. `token_ids` keep a final EOS / stop token id; `text` never shows it, nor a stop string."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None


def _has_int8_weights(model: Qwen3ForCausalLM) -> bool:
    from ..quantize import Int8Linear

    return any(isinstance(m, Int8Linear) for m in model.modules())


def available_memory_bytes() -> int:
    """The memory the OS can give us now: MemAvailable from /proc/meminfo, else free pages (os.sysconf)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@torch.inference_mode()
def blocks_from_gpu_memory(model: Qwen3ForCausalLM, max_tokens: int, max_num_seqs: int, block_bytes: int,
                           utilization: float) -> int:  # fmt: skip
    """Blocks that fit in utilization x total after the weights and a measured peak-activation warm-up."""
    device = model.model.norm.weight.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    # The largest step: max_tokens packed tokens (one causal row stands in for the paged kernels, whose
    # working memory is their output), logits for max_num_seqs rows, and the sort-based sampling filters.
    rows = min(max_num_seqs, max_tokens)
    ids = torch.zeros(1, max_tokens, dtype=torch.long, device=device)
    positions = (torch.arange(max_tokens, device=device) % model.config.max_position_embeddings)[None]
    index = torch.linspace(0, max_tokens - 1, rows, device=device).long()[None]
    logits = model(ids, positions, CausalAttention(), logits_index=index)[0]
    warm = [Sequence(str(i), [0], SamplingParams(top_p=0.9, min_p=0.1), -1) for i in range(rows)]
    Sampler(max_num_seqs, model.config.vocab_size, device)(logits, warm)  # its peak memory
    del logits
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)
    used = total - free
    peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
    available = total * utilization - used - peak + current
    return int(available) // block_bytes


def propose_num_blocks(model: Qwen3ForCausalLM, kv_cache_tokens: int | None, block_size: int, max_num_seqs: int,
                       max_model_len: int, max_num_batched_tokens: int, utilization: float, ranks: int = 1,
                       kv_dtype: torch.dtype | None = None) -> int:  # fmt: skip
    """The pool's size in blocks for this process's model (its own KV heads under tensor parallelism): fixed by
    kv_cache_tokens, else measured on CUDA (a warm-up forward: every tensor-parallel rank runs it), else
    max_num_seqs x max_model_len tokens capped at a share of the RAM (split between the ranks of one machine)."""
    config, weight = model.config, model.model.norm.weight
    block_bytes = KVPool.bytes_per_block(config.num_hidden_layers, block_size, model.num_kv_heads, config.head_dim,
                                         kv_dtype or weight.dtype)  # fmt: skip
    if kv_cache_tokens is not None:
        return -(-kv_cache_tokens // block_size)
    if weight.device.type == "cuda":
        return blocks_from_gpu_memory(model, max_num_batched_tokens, max_num_seqs, block_bytes, utilization)
    wanted = -(-max_num_seqs * max_model_len // block_size)
    return min(wanted, int(available_memory_bytes() * CPU_RAM_SHARE / ranks) // block_bytes)


class LLM:
    """An engine over one model: `generate` many prompts at once (continuous batching, paged KV, prefix cache).

    `model` is a directory, a Hub id or "demo" (as load_model), or a built Qwen3ForCausalLM (then pass
    `tokenizer`, or None to work with token ids only). See docs/engine.md.
    """

    def __init__(
        self,
        model: str | os.PathLike | Qwen3ForCausalLM = "Qwen/Qwen3-0.6B",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        kv_cache_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        *,
        tokenizer: Tokenizer | None = None,
        max_num_batched_tokens: int | None = None,
        block_size: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        quantize: str | None = None,
        tensor_parallel_size: int = 1,
        compile: bool = False,
        kv_cache_dtype: str = "auto",
        gemv: bool | None = None,
        persistent_decode: bool | None = None,
    ) -> None:
        for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                            ("kv_cache_tokens", kv_cache_tokens), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("block_size", block_size)):  # fmt: skip
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"LLM: {name}={value!r} must be a positive integer")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"LLM: gpu_memory_utilization={gpu_memory_utilization!r} must be in (0, 1]")
        if gemv not in (None, True, False):  # before loading anything, as every other argument check
            raise ValueError(f"LLM: gemv={gemv!r} must be None (int8 weights on CUDA), True or False")
        if persistent_decode not in (None, True, False):
            raise ValueError(f"LLM: persistent_decode={persistent_decode!r} must be None (where it applies), True or "
                             "False")  # fmt: skip
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"LLM: kv_cache_dtype={kv_cache_dtype!r} must be one of {', '.join(KV_CACHE_DTYPES)}")
        if kv_cache_dtype != "auto" and (tensor_parallel_size != 1 or compile):
            # compile=True: inductor (torch 2.11) fails on the fp8 pool's kernels (H200, 2026-12-01: NOTES.md)
            raise ValueError(f"LLM: kv_cache_dtype={kv_cache_dtype!r} is not supported with tensor parallelism or "
                             "compile=True yet")
        if quantize not in (None, "int8"):
            raise ValueError(f"LLM: quantize={quantize!r} must be None or 'int8'")
        if not isinstance(compile, bool) or (compile and (enforce_eager or tensor_parallel_size != 1)):
            raise ValueError(f"LLM: compile={compile!r} must be a bool, and True only without enforce_eager and "
                             "tensor parallelism (it compiles the CUDA-graph engine's forward)")

        self.tp = None  # the tensor-parallel workers (tensor_parallel.py), when tensor_parallel_size > 1
        self._tp_settings = None
        if tensor_parallel_size != 1:
            if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) \
                    or tensor_parallel_size < 1:
                raise ValueError(f"LLM: tensor_parallel_size={tensor_parallel_size!r} must be a positive integer")
            if isinstance(model, Qwen3ForCausalLM):
                raise ValueError("LLM: tensor_parallel_size > 1 needs a checkpoint source (a directory, a Hub id or "
                                 "'demo'), not a built model: each rank loads only its slice")
            self._tp_settings = dict(
                size=tensor_parallel_size, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                kv_cache_tokens=kv_cache_tokens, max_num_batched_tokens=max_num_batched_tokens,
                block_size=block_size, gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            )  # fmt: skip
        self.model, self.tokenizer = self._load(model, device, dtype, tokenizer, quantize)
        model_ = self.model
        weight = model_.model.norm.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.kv_dtype = KV_CACHE_DTYPES[kv_cache_dtype] or self.dtype  # the pool's element type
        config = model_.config
        limit = config.max_position_embeddings
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"LLM: max_model_len={max_model_len} exceeds the model's max_position_embeddings {limit}")
        max_model_len = max_model_len or limit
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        block_size = block_size or DEFAULT_BLOCK_SIZE[kind]
        max_num_batched_tokens = max_num_batched_tokens or DEFAULT_BATCHED_TOKENS[kind]
        eos = tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else self._eos_ids
        self.kernels = kernels_for(self.device)
        if max_num_seqs > getattr(self.kernels, "max_decode_seqs", max_num_seqs):
            raise ValueError(f"LLM: max_num_seqs={max_num_seqs} exceeds the {self.kernels.max_decode_seqs} sequences "
                             "the Triton decode kernel takes in one step")  # fmt: skip
        if gemv and (self.kernels.name != "triton" or self.tp is not None):
            raise ValueError("LLM: gemv=True needs CUDA and the Triton kernels, without tensor parallelism")
        if gemv or (gemv is None and self.kernels.name == "triton" and self.tp is None and _has_int8_weights(model_)):
            # The projections of the model (swapped in place, Parameters shared) take a split-K Triton GEMV for
            # steps of <= 16 rows: for int8 weights it reads the int8 bytes, 1.40x the dequantise + cuBLAS path at
            # batch 1 on the H200, hence the default; in bf16 it gained nothing (RESULTS.md).
            from ..kernels.gemv_linear import use_gemv

            use_gemv(model_)
        if compile and self.kernels.name != "triton":  # the CPU never compiles: it has no CUDA graphs
            raise ValueError(f"LLM: compile=True needs CUDA and the Triton kernels; the model is on {self.device} "
                             f"with the {self.kernels.name} kernels")

        persistent_decode = self._resolve_persistent_decode(persistent_decode, enforce_eager)
        nkv, layers = model_.num_kv_heads, config.num_hidden_layers
        block_bytes = KVPool.bytes_per_block(layers, block_size, nkv, config.head_dim, self.kv_dtype)
        if self.tp is not None:  # the workers size their pools (and warm up) with rank 0's numbers
            self.tp.send_sizes(max_model_len, block_size, max_num_batched_tokens)
        num_blocks = propose_num_blocks(model_, kv_cache_tokens, block_size, max_num_seqs, max_model_len,
                                        max_num_batched_tokens, gpu_memory_utilization,
                                        1 if self.tp is None else self.tp.size, self.kv_dtype)  # fmt: skip
        if self.tp is not None:  # every rank proposed its own; all take the smallest
            num_blocks = self.tp.agree(num_blocks)
        if num_blocks < 1:
            raise ValueError(f"LLM: no memory left for the KV cache ({block_bytes} bytes per block of {block_size})")
        max_model_len = min(max_model_len, num_blocks * block_size)

        self.config = EngineConfig(
            device=self.device, dtype=self.dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, num_blocks=num_blocks,
            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
            vocab_size=config.vocab_size, eos_token_ids=eos, compile=compile, persistent_decode=persistent_decode,
        )  # fmt: skip
        self.pool = KVPool(layers, num_blocks, block_size, nkv, config.head_dim, self.kv_dtype, self.device)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.sampler = Sampler(max_num_seqs, config.vocab_size, self.device,
                               fused_sample=getattr(self.kernels, "sample", None))
        self.runner = ModelRunner(model_, self.config, self.pool, self.kernels, tp=self.tp)
        self._request_counter = itertools.count()
        self._arrival = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.last_step_tokens = (0, 0)
        self._in_flight: InFlight | None = None

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (also done when the LLM is garbage-collected or at exit);
        nothing to do in one process."""
        if self.tp is not None:
            self.tp.shutdown()

    # -------------------------------------------------------------------------------------------
    # Setup

    def _resolve_persistent_decode(self, wanted: bool | None, enforce_eager: bool) -> bool:
        """persistent_decode: None takes it where it applies (CUDA graphs, the Triton kernels, bf16 / fp16 weights
        in plain projections, a pool of the same dtype, one process); True requires it (float32 too)."""
        if wanted is False:
            return False
        if self.tp is not None or self.device.type != "cuda" or enforce_eager:
            reason = "it needs CUDA graphs on one GPU (no tensor parallelism, no enforce_eager)"
        else:
            from .persistent import unavailable

            reason = unavailable(self.model, self.kv_dtype, self.kernels.name, self.dtype, any_dtype=bool(wanted))
        if reason is not None and wanted:
            raise ValueError(f"LLM: persistent_decode=True, but {reason}")
        return reason is None

    def _load(self, model: str | os.PathLike | Qwen3ForCausalLM, device: str | torch.device | None,
              dtype: torch.dtype | None, tokenizer: Tokenizer | None,
              quantize: str | None) -> tuple[Qwen3ForCausalLM, Tokenizer | None]:  # fmt: skip
        self._eos_ids: tuple[int, ...] = ()
        if isinstance(model, Qwen3ForCausalLM):
            if device is not None or dtype is not None:
                model = model.to(device=device, dtype=dtype)
            if quantize == "int8":
                from ..quantize import quantize_int8

                quantize_int8(model)
            return model.eval(), tokenizer
        from ..checkpoint import load_model
        from ..device import default_dtype, resolve_device
        from ..hub import MODEL_FILES, TOKENIZER_FILES, resolve_source
        from ..tokenizer import load_tokenizer

        # None: CUDA if there is one, else the CPU (the engine has no MPS path); a name is checked up front
        device = resolve_device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or default_dtype(device)
        directory = resolve_source(model, sorted(set(MODEL_FILES + TOKENIZER_FILES)))
        if self._tp_settings is not None:
            from .tensor_parallel import TensorParallel

            self.tp = TensorParallel.start(directory, device, dtype, quantize, self._tp_settings)
            loaded = self.tp.load_model()
        else:
            loaded = load_model(directory, device=device, dtype=dtype)
        if quantize == "int8":
            from ..quantize import quantization_config, quantize_int8

            if quantization_config(loaded) is None:
                quantize_int8(loaded)
        if tokenizer is None and (directory / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(directory)
        generation_config = directory / "generation_config.json"
        if generation_config.is_file():
            import json

            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            self._eos_ids = () if eos is None else tuple([eos] if isinstance(eos, int) else eos)
        return loaded, tokenizer

    # -------------------------------------------------------------------------------------------
    # Requests

    def make_sequence(self, index: int | str, prompt: str | SequenceABC[int], params: SamplingParams,
                      request_id: str, stream: bool) -> Sequence:  # fmt: skip
        """Validate one request and build its Sequence; ValueError naming the request (`index`) if it is bad."""
        where = f"request {index}"
        if not isinstance(params, SamplingParams):
            raise ValueError(f"{where}: sampling_params must be a SamplingParams, found {type(params).__name__}")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{where}: a text prompt needs a tokenizer (this LLM has none: pass token ids)")
            ids = self.tokenizer.encode(prompt, allow_special=True)
        else:
            if hasattr(prompt, "tolist"):  # a tensor or a NumPy array of ids
                prompt = prompt.tolist()
            if not isinstance(prompt, SequenceABC):
                raise ValueError(f"{where}: a prompt is a string or a list of token ids")
            if not set(map(type, prompt)) <= {int}:  # (checked per element only when not all are plain ints)
                if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in prompt):
                    raise ValueError(f"{where}: token ids must be integers")
            ids, prompt = list(map(int, prompt)), None
        vocab = self.config.vocab_size
        if not ids:
            raise ValueError(f"{where}: the prompt is empty (it needs at least one token)")
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(i for i in ids if not 0 <= i < vocab)
            raise ValueError(f"{where}: token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(ids) > self.max_model_len - 1:
            raise ValueError(
                f"{where}: the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} and the prompt "
                f"must leave room for at least one generated token"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError(f"{where}: stop strings need a tokenizer (this LLM has none)")
        if self.tokenizer is not None and (stream or params.stop):
            eos = () if params.ignore_eos else self.config.eos_token_ids
            text = TextStream(self.tokenizer, params.stop, eos_token_ids=eos, stop_token_ids=params.stop_token_ids)
        return Sequence(request_id, ids, params, next(self._arrival), prompt=prompt, text=text)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        self.prompt_tokens_total += seq.num_prompt_tokens

    def abort(self, seq: Sequence) -> None:
        """Stop `seq` now and free its blocks (a token still in flight for it is dropped)."""
        if seq.status is not Status.FINISHED:
            if seq.num_pending:
                seq.token_ids.pop()
                seq.num_pending = 0
            self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.scheduler.remove(seq)
        self.sampler.release(seq)

    @property
    def num_running(self) -> int:
        """Requests being generated: the scheduler's running sequences, plus those whose last token is still on its
        way to the host (a sequence that reaches max_tokens leaves the scheduler when that token is sampled, and
        finishes one step later, when it is read back)."""
        in_flight = self._in_flight
        finishing = 0 if in_flight is None else sum(1 for s in in_flight.seqs if s.length_capped and not s.finished)
        return len(self.scheduler.running) + finishing

    def has_work(self) -> bool:
        """Requests waiting or running, or sampled tokens not yet read back."""
        return self.scheduler.has_work() or self._in_flight is not None

    # -------------------------------------------------------------------------------------------
    # The step

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Launch one forward and its sampling; read back the previous step's tokens while the GPU computes.
        Returns the sequences whose new token was read back in this call (finished ones included).

        The tokens sampled in step n reach the host only during step n + 1: each sampled sequence gets a
        placeholder token (PENDING) at once, so the scheduler can plan step n + 1 (its input token is taken
        from the device), and the real id replaces it after step n + 1 has been launched. A sequence that
        step n's token ends (EOS, a stop) has then run one step too many; that step's result is dropped.
        """
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            self.sampler.release(seq)
        self.last_step_tokens = (0, 0)
        in_flight, self._in_flight = self._in_flight, None
        if not batch:
            if in_flight is None and self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError(f"engine stalled: {self.scheduler.waiting[0]} does not fit in an empty pool")
            return self._read_back(in_flight) if in_flight is not None else []
        logits, sampling = self.runner.run(batch, in_flight)
        decodes = sum(1 for seq in sampling if seq.num_computed_tokens >= seq.num_prompt_tokens)
        self.last_step_tokens = (batch.num_tokens - decodes, decodes)  # (prefill, decode), for the progress bar
        touched = self._read_back(in_flight) if in_flight is not None else []  # overlaps this step's forward
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if not seq.finished:  # (a sequence that the previous step's token ended has no blocks any more)
                seq.num_computed_tokens += n
                self.block_manager.register_full_blocks(seq)  # after the read-back: no PENDING in a hash
        live = [i for i, seq in enumerate(sampling) if not seq.finished]
        if live:
            if len(live) < len(sampling):
                logits = logits[self.runner.to_device(live, torch.long)]
                sampling = [sampling[i] for i in live]
            self._in_flight = self._sample(logits, sampling)
        return touched

    def _sample(self, logits: torch.Tensor, sampling: list[Sequence]) -> InFlight:
        """Sample on the device, start the copy of the ids to the host, and give each sequence a placeholder."""
        next_ids, chosen, top = self.sampler(logits, sampling)
        host = [t for t in (next_ids, chosen, top) if t is not None]
        event = None
        if self.device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in host]
            event = torch.cuda.Event()
            event.record()
        for seq in sampling:
            seq.token_ids.append(PENDING)
            seq.num_pending = 1
            p = seq.params
            if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.length_capped = True  # no further step: free its blocks now; it ends when its token arrives
                self.scheduler.remove(seq)
                self.sampler.release(seq)
        return InFlight(sampling, {seq: i for i, seq in enumerate(sampling)}, next_ids, host, event)

    def _read_back(self, in_flight: InFlight) -> list[Sequence]:
        """Wait for a step's sampled ids on the host; put them in place of the placeholders; finish sequences."""
        if in_flight.event is not None:
            in_flight.event.synchronize()  # only the copy: the forward launched after it keeps running
        if self.tp is not None:
            self.tp.check()  # a worker that died during the step: its collectives were aborted, the ids are void
        ids = in_flight.host[0].tolist()
        chosen = in_flight.host[1] if len(in_flight.host) > 1 else None
        top = in_flight.host[2] if len(in_flight.host) > 2 else None
        touched = []
        for i, (seq, token_id) in enumerate(zip(in_flight.seqs, ids, strict=True)):
            if seq.finished:  # aborted meanwhile
                continue
            logprob = None
            if chosen is not None and seq.logprobs is not None:
                logprob = logprobs_for_row(chosen, top, i, seq.params.logprobs, token_id)
            self._append(seq, token_id, logprob)
            touched.append(seq)
        return touched

    def _append(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> None:
        assert seq.token_ids[-1] == PENDING, seq
        seq.token_ids[-1] = token_id
        seq.num_pending = 0
        self.generation_tokens_total += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
        p = seq.params
        if seq.text is not None:
            seq.stream_text += seq.text.push(token_id)
            stopped = seq.text.finished
        else:
            stopped = (not p.ignore_eos and token_id in self.config.eos_token_ids) or token_id in p.stop_token_ids
        if stopped:
            self._finish(seq, "stop")
        elif seq.length_capped:
            if seq.text is not None:
                seq.stream_text += seq.text.finish()
            self._finish(seq, "stop" if seq.text is not None and seq.text.finished else "length")

    # -------------------------------------------------------------------------------------------
    # Offline generation

    def generate(
        self,
        prompts: str | SequenceABC[str] | SequenceABC[SequenceABC[int]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in prompt order. Bad requests raise ValueError before anything runs."""
        if isinstance(prompts, str) or (isinstance(prompts, SequenceABC) and prompts
                                        and isinstance(prompts[0], numbers.Integral)):  # fmt: skip
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts (one, or one each)")
        seqs = [self.make_sequence(i, prompt, p, str(next(self._request_counter)), stream=False)
                for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))]  # fmt: skip
        for seq in seqs:
            self.add(seq)
        bar = tqdm(total=len(seqs), desc="generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        done = 0
        try:
            while self.has_work():
                started = time.perf_counter()
                self.step()
                seconds = max(time.perf_counter() - started, 1e-9)
                if use_tqdm:
                    finished = sum(s.finished for s in seqs)
                    bar.update(finished - done)
                    done = finished
                    prefill, decode = self.last_step_tokens
                    bar.set_postfix(prefill=f"{prefill / seconds:.0f} tok/s", decode=f"{decode / seconds:.0f} tok/s",
                                    refresh=False)  # fmt: skip
        finally:
            bar.close()
            if any(not seq.finished for seq in seqs):  # an interrupt or an error: leave no request holding blocks
                for seq in seqs:
                    if not seq.finished:
                        self.abort(seq)
                self._in_flight = None
        return [self.output(seq) for seq in seqs]

    def output(self, seq: Sequence) -> RequestOutput:
        """The RequestOutput of a finished sequence."""
        if seq.text is not None:
            text = seq.text.text
        elif self.tokenizer is not None:
            ids = seq.output_token_ids
            if seq.finish_reason == "stop" and ids:
                ids = ids[:-1]  # the EOS or stop token id ends the text without appearing in it
            text = self.tokenizer.decode(ids)
        else:
            text = ""
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, text, seq.output_token_ids,
                             seq.finish_reason or "length", seq.num_cached_tokens or 0, seq.logprobs)  # fmt: skip
