"""The `qwen3` command: generate, chat, info, quantize (train / merge-lora from qwen3.train, serve / batch from
qwen3.server).

A thin layer over the library: it parses the flags, checks them all before anything is loaded (device,
sampling, lengths: an error names the flag), resolves the model once (a directory, or a Hub id fetched with
progress bars by huggingface_hub), and calls the public functions. User errors (no model, offline, bad flags,
a prompt that does not fit) print one line on stderr and exit with status 2; Ctrl-C exits with 130 and a
reader that goes away (`| head`) ends the output quietly. Prompt text with invalid UTF-8 is read with
U+FFFD in place of what does not decode (tokenizer.valid_text), as chat reads its lines.

`generate` and `chat` on CUDA decode with the engine at batch 1 (qwen3.engine.stream: a CUDA graph per step, and
for chat one LLM whose prefix cache keeps the earlier turns); with --compile that engine compiles its steps and
its projections take the Triton GEMV (LLM(compile=True, gemv=True): 830 against 387 tokens/s on the H200, after
3 minutes of compiling the first time, 41 s from the compile cache). On the CPU, and with --tp or --speculative,
they call generate_text (--compile there is the plain path's compiled step). `args.engine` (no flag: tests set it)
forces one or the other.

`generate` and `chat` with `--tp N` restart themselves under torchrun in N processes (qwen3.parallel): rank 0
reads standard input and prints, the other ranks compute in step with it. Ctrl-C then ends the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from .chat_session import CHAT_HELP, run_chat
from .checkpoint import CheckpointError, load_model, save_model
from .compile_cache import CACHE_ENV, use_persistent_compile_cache
from .config import ConfigError, Qwen3Config
from .device import default_dtype, resolve_device
from .generate import Completion, ContextLengthError, generate_text
from .hub import (
    MODEL_FILES,
    TOKENIZER_FILES,
    ModelNotFoundError,
    copy_tokenizer_files,
    new_model_directory,
    resolve_source,
)
from .info import model_info, plot_format, plot_memory
from .model import Qwen3ForCausalLM
from .parallel import finish, join_tensor_parallel, launch_tensor_parallel, load_model_tp, on_rank0
from .quantize import quantization_config, quantize_int8
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer, valid_text

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "seed")  # fmt: skip


class UserError(Exception):
    """An error in what the user asked for; printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------
# Shared flags and set-up
# ---------------------------------------------------------------------------------------------------


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory or Hub repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU, float32 on the CPU")  # fmt: skip
    p.add_argument("--quantize", choices=["int8"], help="quantize the weights at load (int8 weight-only)")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: the engine compiles its steps, Triton GEMV projections (2x the tokens/s on an H200, "
                        "3 minutes to start the first time, ~40 s from the compile cache, kept in "
                        "~/.cache/qwen3/torchinductor unless TORCHINDUCTOR_CACHE_DIR is set); CPU: the plain "
                        "path's torch.compile")  # fmt: skip
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism over N processes, one GPU each (restarts under torchrun)")  # fmt: skip


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json)")
    g.add_argument("--temperature", type=float, help="0 for greedy")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, help="keep the smallest set with this much probability")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability")
    g.add_argument("--presence-penalty", type=float, help="subtract from tokens already generated")
    g.add_argument("--frequency-penalty", type=float, help="subtract per occurrence in the output")
    g.add_argument("--repetition-penalty", type=float, help="divide logits of seen tokens (1 = off)")
    g.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    g.add_argument("--max-new-tokens", type=int, default=None, help="limit on generated tokens")


def check_flags(args: argparse.Namespace) -> None:
    """Every check that needs no model, run before anything is resolved, loaded or launched."""
    if getattr(args, "tp", 1) < 1:
        raise UserError(f"--tp {args.tp}: must be a number of processes >= 1")
    if getattr(args, "tp", 1) > 1 and getattr(args, "quantize", None):
        raise UserError("--quantize: not supported with --tp; quantize first with `qwen3 quantize`, then load "
                        "that checkpoint with --tp")
    if getattr(args, "device", None) is not None:  # generate, chat, train
        resolve_device(args.device)  # a device this machine lacks: one line now, not a traceback at load
    if hasattr(args, "top_p"):
        sampling_overrides(args)
        if args.max_new_tokens is not None and args.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be >= 0")
    if getattr(args, "speculative", 0) < 0:
        raise UserError(f"--speculative {args.speculative}: must be a number of draft tokens >= 0 (0 = off)")
    if any(not s for s in getattr(args, "stop", ())):
        raise UserError("--stop: an empty stop string would end every answer before its first character")
    if getattr(args, "max_model_len", None) is not None and args.max_model_len <= 0:
        raise UserError(f"--max-model-len {args.max_model_len}: must be a number of tokens > 0")
    if getattr(args, "context", None) is not None and args.context <= 0:
        raise UserError(f"--context {args.context}: must be a number of tokens > 0")
    if getattr(args, "plot", None) is not None:
        try:
            plot_format(args.plot)
        except ValueError as e:
            raise UserError(f"--plot {e}") from e


def sampling_overrides(args: argparse.Namespace) -> dict:
    """The sampling flags given, each checked alone so that an error names its flag."""
    given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    for name, value in given.items():
        try:
            SamplingParams(**{name: value})
        except ValueError as e:  # "SamplingParams.top_p=1.5 is invalid: it must be in (0, 1]"
            reason = str(e).partition(" is invalid: it ")[2] or str(e)
            raise UserError(f"--{name.replace('_', '-')} {value}: {reason}") from e
    return given


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def read_stdin() -> str:
    """All of standard input, decoded as UTF-8 with what does not decode replaced by U+FFFD (as valid_text does
    for a prompt given as an argument, which reaches sys.argv with its invalid bytes as lone surrogates)."""
    buffer = getattr(sys.stdin, "buffer", None)
    return buffer.read().decode("utf-8", errors="replace") if buffer is not None else valid_text(sys.stdin.read())


def resolve_model(args: argparse.Namespace) -> Path:
    """The local directory of --model (downloaded with progress bars if needed): weights and tokenizer."""
    return resolve_source(args.model, sorted(set(MODEL_FILES + TOKENIZER_FILES)))


def load(args: argparse.Namespace, directory: Path | None = None) -> tuple[Qwen3ForCausalLM, Tokenizer, Path]:
    """Resolve --model once (unless `directory` is given), then load weights and tokenizer."""
    directory = directory if directory is not None else resolve_model(args)
    device = resolve_device(args.device)
    if args.tp > 1:
        model = load_model_tp(directory, device=device, dtype=pick_dtype(args.dtype, device))
    else:
        model = load_model(directory, device=device, dtype=pick_dtype(args.dtype, device), progress=sys.stderr.isatty())
    if args.quantize == "int8" and quantization_config(model) is None:
        quantize_int8(model)
    return model, load_tokenizer(directory), directory


def use_engine(args: argparse.Namespace, model: Qwen3ForCausalLM) -> bool:
    """Decode with the engine: on CUDA unless --tp or --speculative asks for the plain path."""
    if getattr(args, "engine", None) is not None:
        return args.engine
    plain = args.tp > 1 or getattr(args, "speculative", 0)
    return model.lm_head.weight.device.type == "cuda" and not plain


def engine_options(args: argparse.Namespace) -> dict[str, bool]:
    """The engine's LLM options from the flags: --compile compiles every step and puts the Triton GEMV behind the
    projections (measured together: benchmarks/RESULTS.md, batch-1 decode)."""
    return {"compile": True, "gemv": True} if args.compile else {}


def announce_compile(args: argparse.Namespace, engine: bool) -> None:
    """A compiled engine compiles before its first token (H200: ~3 minutes from nothing, ~40 s from the compile
    cache, benchmarks/RESULTS.md): say so on stderr, and where the result is kept, instead of a silent wait."""
    if engine and args.compile:
        where = os.environ.get(CACHE_ENV) or "torch's compile cache"
        print(f"qwen3: compiling the engine's steps (minutes the first time; later starts reuse {where})",
              file=sys.stderr, flush=True)  # fmt: skip


def use_cpu_kernels(args: argparse.Namespace, model: Qwen3ForCausalLM) -> None:
    """The plain path on the CPU: float32 projections take qwen3's CPU GEMV at decode (kernels/cpu_linear.py; int8
    weights have theirs already). Not with --tp (parallel linears) or --compile (inductor's own code)."""
    if model.lm_head.weight.device.type == "cpu" and args.tp == 1 and not args.compile:
        from .kernels.cpu_linear import use_cpu_gemv

        use_cpu_gemv(model)


def sampling_from_args(args: argparse.Namespace, directory: Path) -> SamplingParams:
    """The sampling flags over the model's generation_config.json defaults."""
    overrides = sampling_overrides(args)
    source = directory / "generation_config.json"
    if source.is_file():
        return SamplingParams.from_generation_config(source, **overrides)
    return SamplingParams(**overrides)


# ---------------------------------------------------------------------------------------------------
# qwen3 generate
# ---------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = valid_text(args.prompt) if args.prompt is not None else on_rank0(read_stdin)  # rank 0 reads stdin
    if not prompt:
        raise UserError("no prompt: pass it as an argument or on standard input")
    directory = resolve_model(args)
    sampling = sampling_from_args(args, directory)
    if args.speculative and not sampling.greedy:
        raise UserError(f"--speculative {args.speculative}: prompt-lookup decoding is greedy only; add --temperature 0")
    model, tok, _ = load(args, directory)
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": valid_text(args.system)})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=not args.no_think)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else 256
    stops = [valid_text(s) for s in args.stop]

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    if use_engine(args, model):
        from .engine.stream import complete, single_llm

        prompt_ids = tok.encode(prompt, allow_special=True)
        context = model.config.max_position_embeddings
        if len(prompt_ids) + max_new > context:  # generate_text's check and words
            raise ContextLengthError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) = "
                                     f"{len(prompt_ids) + max_new} exceeds the model's context of {context} tokens")
        announce_compile(args, True)
        llm = single_llm(model, tok, len(prompt_ids) + max_new, **engine_options(args))  # a pool this size
        run = partial(complete, llm, prompt_ids)
    else:
        use_cpu_kernels(args, model)
        run = partial(generate_text, model, tok, prompt, compile=args.compile, speculative=args.speculative)
    if args.json:
        completion = run(max_new, sampling, stops)
        print(json.dumps(completion_json(completion), ensure_ascii=False))
    else:
        completion = run(max_new, sampling, stops, on_text=write)
        sys.stdout.write("\n")
    return 0


def completion_json(c: Completion) -> dict:
    from .chat import parse_completion

    parsed = parse_completion(c.text)
    return {
        "text": c.text,
        "reasoning": parsed.reasoning,
        "content": parsed.content,
        "tool_calls": [{"name": t.name, "arguments": t.arguments} for t in parsed.tool_calls],
        "finish_reason": c.finish_reason,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "seconds": round(c.seconds, 4),
        "seconds_to_first_token": round(c.seconds_to_first_token, 4),
        "tokens_per_second": round(c.tokens_per_second, 2),
    }


# ---------------------------------------------------------------------------------------------------
# qwen3 chat
# ---------------------------------------------------------------------------------------------------

def cmd_chat(args: argparse.Namespace) -> int:
    """The interactive loop lives in qwen3.chat_session (line editor, commands, history kept inside the context)."""
    directory = resolve_model(args)
    sampling = sampling_from_args(args, directory)
    model, tok, _ = load(args, directory)
    engine = use_engine(args, model)
    if not engine:
        use_cpu_kernels(args, model)
    announce_compile(args, engine)
    return run_chat(model, tok, sampling, name=args.model, max_new_tokens=args.max_new_tokens,
                    thinking=not args.no_think, system=args.system, compile=args.compile,
                    engine=engine, max_model_len=args.max_model_len, engine_options=engine_options(args))  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# qwen3 info
# ---------------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    if args.preset:
        config, name = Qwen3Config.from_preset(args.preset), f"preset {args.preset}"
    else:
        config, name = Qwen3Config.from_json(resolve_source(args.model, ["config.json"]) / "config.json"), args.model
    info = model_info(config, args.context)
    if args.plot:
        try:
            plot_memory(config, name, info, args.plot)
        except ImportError as e:
            raise UserError(f"--plot: {e}") from e
    if args.json:
        print(json.dumps({"model": name, "config": config.to_dict(), **info}, indent=2))
        return 0
    gib, c, context = 2**30, config, info["context"]
    lines = [
        name,
        f"  layers {c.num_hidden_layers}, hidden {c.hidden_size}, MLP {c.intermediate_size} (SwiGLU), "
        f"vocab {c.vocab_size}",
        f"  attention: {c.num_attention_heads} query heads, {c.num_key_value_heads} KV heads of dim {c.head_dim} "
        f"(GQA groups of {c.num_key_value_groups}), QK-norm, RoPE theta {c.rope_theta:g} ({c.rope_type})",
        f"  context {c.max_position_embeddings}, RMSNorm eps {c.rms_norm_eps:g}, "
        f"tied embeddings: {c.tie_word_embeddings}",
        f"parameters: {info['parameters']:,} total (unique), "
        f"{info['parameters_non_embedding']:,} without the embedding",
        "weights:    " + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in info["weights_bytes"].items()),
        f"KV cache:   {info['kv_cache_bytes_per_token_bf16'] / 1024:.0f} KiB/token in bf16; "
        f"{info['kv_cache_bytes_bf16'] / gib:.3f} GiB at {context:,} tokens",
        f"GQA saving: {info['gqa_saving']:.0%} of the KV cache versus multi-head attention "
        f"({info['kv_cache_bytes_mha_bf16'] / gib:.3f} GiB at {context:,} tokens)",
    ]
    if args.plot:
        lines.append(f"memory plot: {args.plot}")
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------------------------
# qwen3 quantize
# ---------------------------------------------------------------------------------------------------


def cmd_quantize(args: argparse.Namespace) -> int:
    directory = resolve_model(args)
    # Checked before loading: --out is not the source, and empty unless --overwrite; written beside and renamed.
    with new_model_directory(args.out, overwrite=args.overwrite, source=directory) as tmp:
        model = load_model(directory, dtype=getattr(torch, args.dtype), progress=sys.stderr.isatty())
        if quantization_config(model) is not None:
            raise UserError(f"{args.model} is already quantized")
        before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        quantize_int8(model, include_embedding=args.include_embedding)
        save_model(model, tmp)
        copy_tokenizer_files(directory, tmp)
        after = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    print(
        f"wrote {args.out}: int8 weights, {after / 2**30:.2f} GiB on disk (float state dict: {before / 2**30:.2f} GiB)"
    )
    return 0


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3", description="Qwen3 from scratch: generate, chat, train, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="complete a prompt (streams to stdout)", description="Complete a prompt.")
    p.add_argument("prompt", nargs="?", help="the prompt (read from standard input if omitted)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--no-think", action="store_true", help="with --chat: disable thinking (empty think block)")
    p.add_argument("--system", help="with --chat: a system prompt")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable, not empty)")
    p.add_argument("--json", action="store_true", help="print reasoning, content, token counts and timing as JSON")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="prompt-lookup speculative decoding with K draft tokens (greedy only)")  # fmt: skip
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate, engine=None)

    p = sub.add_parser("chat", help="interactive multi-turn chat", description=f"Interactive chat. {CHAT_HELP}.")
    p.add_argument("--no-think", action="store_true", help="start with thinking off")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="context of the chat in tokens (default: the model's); on CUDA the KV cache holds this many")
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_chat, engine=None)

    p = sub.add_parser("info", help="parameter counts and memory of a model", description="Describe a model.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model directory or Hub id (only config.json is read)")
    p.add_argument("--preset", help="an official size instead of --model: 0.6B, 1.7B, 4B, 8B, 14B, 32B")
    p.add_argument("--context", type=int, default=None,
                   help="tokens of KV cache to size (default: the model's max_position_embeddings)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", type=Path, metavar="FILE",
                   help="also draw the memory (weights by component, KV cache by context length) "
                   "as .png, .jpg, .pdf or .svg")  # fmt: skip
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quantize", help="write an int8 weight-only checkpoint",
                       description="Quantize a checkpoint to int8 weights (per-output-channel scales).")  # fmt: skip
    p.add_argument("--model", default=DEFAULT_MODEL, help="model directory or Hub id")
    p.add_argument("--out", required=True, type=Path, help="output directory (new or empty; not the model's own)")
    p.add_argument("--overwrite", action="store_true", help="replace the model in a non-empty --out")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the scales and of what stays in float")  # fmt: skip
    p.add_argument("--include-embedding", action="store_true", help="quantize the input embedding too")
    p.set_defaults(func=cmd_quantize)

    from .server.cli import add_subcommands as add_server_commands
    from .train.cli import add_subcommands as add_train_commands

    add_train_commands(sub)
    add_server_commands(sub)
    return parser


USER_ERRORS = (UserError, ModelNotFoundError, ConfigError, CheckpointError, ContextLengthError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return finish(130)
    return finish(run_command(args, argv))  # a torchrun worker (--tp, `qwen3 train` on N processes) ends here


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        check_flags(args)
        if getattr(args, "compile", False):  # before anything compiles or starts a process that will
            use_persistent_compile_cache()
        if getattr(args, "tp", 1) != 1:
            if "LOCAL_RANK" not in os.environ:
                return launch_tensor_parallel(args.model, args.tp, argv)
            args.device = str(join_tensor_parallel(args.tp, args.device))
            if dist.get_rank() > 0:  # the other ranks compute in step with rank 0, silently
                with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                    return args.func(args)
        code = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at exit
        return code
    except BrokenPipeError:  # the reader went away (`qwen3 generate ... | head -1`): stop, quietly
        with contextlib.suppress(OSError, ValueError):  # Python's own flush at exit then writes nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a writer ended by the pipe's close
    except USER_ERRORS as e:
        if os.environ.get("QWEN3_TRACEBACK"):
            raise
        message = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        hub_lookup = isinstance(e, ModelNotFoundError) and not message.startswith("no such model directory")
        hint = " (use --model PATH for a local model directory)" if hub_lookup else ""
        if not dist.is_initialized() or dist.get_rank() == 0:  # tensor-parallel ranks fail alike: say it once
            print(f"qwen3: error: {message}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # at any point: start-up (resolving, loading) included
        print(file=sys.stderr)
        return 130
    finally:
        if getattr(args, "tp", 1) > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
