"""`qwen3 serve` and `qwen3 batch`: argparse for the OpenAI-compatible server and offline batch files.

`add_subcommands(subparsers)` registers both on the `qwen3` parser (as `qwen3.train.cli` does for its
commands). FastAPI and uvicorn are imported only when `serve` runs, so the rest of the CLI works without
the `serve` extra; without it, `qwen3 serve` says which extra to install.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from ..train.cli import positive_int

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory, Hub id or demo (default: {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", help="the model name clients use (default: the --model value)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on a GPU, float32 on the CPU",
    )
    p.add_argument("--quantize", choices=["int8"], help="quantize the weights at load (int8 weight-only)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="requests in one batch at most (256)")
    p.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    p.add_argument("--kv-cache-tokens", type=positive_int, help="KV-cache size in tokens (default: from memory)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="keys and values in the model's dtype (auto), or fp8 e4m3: twice the tokens in the cache")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: every step runs a torch.compile'd forward (1.6x the throughput on an H200; about "
                        "four minutes more to start)")  # fmt: skip
    # dest is not "tp": qwen3.cli restarts commands with an args.tp under torchrun; the engine starts its own workers
    p.add_argument("--tp", dest="tensor_parallel_size", type=positive_int, default=1,
                   help="tensor-parallel size: GPUs (processes) the engine splits the model over")  # fmt: skip


def add_subcommands(sub: Any) -> None:
    """Register `serve` and `batch` on the `qwen3` subparsers."""
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with a web chat page",
        description="Serve a model over the OpenAI API (chat, completions, models, metrics) with a chat page at /.",
    )
    _add_engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="require `Authorization: Bearer KEY` on /v1 (repeatable; /health and / stay open)",
    )
    p.add_argument("--max-waiting", type=int, help="answer 429 when more requests than this would wait")
    p.add_argument(
        "--stream-interval",
        type=stream_interval,
        default=1,
        help="stream every N tokens, or auto (1 up to 64 streams, then streams/64); default 1: each token (a stream "
        "that falls behind always gets what gathered in one chunk)",
    )
    p.add_argument(
        "--api-server-count",
        type=int,
        default=1,
        metavar="N",
        help="HTTP processes in front of the one engine process (default 1); more serve more streams at once: one "
        "process writes some tens of thousands of events per second",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let in-flight requests finish (default 30)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "batch",
        help="run an OpenAI Batch API file offline",
        description="Run the requests of an OpenAI Batch API .jsonl file through the engine and "
        "write the results file.",
    )
    p.add_argument("-i", "--input", required=True, type=Path, help="requests .jsonl (custom_id, method, url, body)")
    p.add_argument("-o", "--output", required=True, type=Path, help="results .jsonl (written atomically)")
    _add_engine_flags(p)
    p.set_defaults(func=cmd_batch)


def stream_interval(text: str) -> int | str:
    """--stream-interval: "auto" or an integer >= 1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, found {text}")
    return value


def _missing_extra(e: ImportError) -> int:
    print(f"qwen3: error: this command needs the serve extra ({e}): pip install 'qwen3[serve]'", file=sys.stderr)
    return 2


def engine_arguments(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The model directory for the flags, and the keyword arguments of `qwen3.LLM` for them."""
    from ..hub import MODEL_FILES, TOKENIZER_FILES, resolve_source

    directory = resolve_source(args.model, sorted(set(MODEL_FILES + TOKENIZER_FILES)))
    dtype = None if args.dtype == "auto" else args.dtype
    import torch

    return directory, {
        "device": None if args.device == "auto" else args.device,
        "dtype": None if dtype is None else getattr(torch, dtype),
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.max_model_len,
        "kv_cache_tokens": args.kv_cache_tokens,
        "quantize": args.quantize,
        "tensor_parallel_size": args.tensor_parallel_size,
        "kv_cache_dtype": args.kv_cache_dtype,
        "compile": args.compile,
    }


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .app import bind_socket, create_app, run_server
    except ImportError as e:
        return _missing_extra(e)
    from ..engine import AsyncLLM

    if args.max_waiting is not None and args.max_waiting < 0:
        raise ValueError(f"--max-waiting: must be >= 0, found {args.max_waiting}")
    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count: must be at least 1, found {args.api_server_count}")
    sock = bind_socket(args.host, args.port)  # a busy port fails now, not after the model has loaded
    banner = f"qwen3 serve: {args.served_model_name or args.model} on {{url}} (chat page at /, OpenAI API at /v1)"
    if args.api_server_count > 1:
        from ..engine import LLM
        from .front_ends import FrontEnd, serve_front_ends

        try:
            directory, kwargs = engine_arguments(args)
        except BaseException:
            sock.close()
            raise
        options = FrontEnd(args.served_model_name or args.model, directory, tuple(args.api_key), args.max_num_seqs,
                           args.max_waiting, args.stream_interval, args.drain_timeout)  # fmt: skip
        return serve_front_ends(args.api_server_count, LLM, (str(directory),), kwargs, sock, options, banner)
    try:
        from ..engine import LLM
        from .serving import ServingContext

        directory, kwargs = engine_arguments(args)
        # The engine steps in a process of its own, so that its Python work does not share the GIL with the
        # server's (engine_process.py).
        engine = AsyncLLM.spawn(LLM, str(directory), stream_interval=args.stream_interval, **kwargs)
    except BaseException:
        sock.close()
        raise
    try:
        ctx = ServingContext.for_engine(engine, args.served_model_name or args.model, directory)
        app = create_app(
            engine,
            ctx,
            api_keys=args.api_key,
            max_num_seqs=args.max_num_seqs,
            max_waiting=args.max_waiting,
        )
    except BaseException:
        sock.close()
        asyncio.run(engine.shutdown())
        raise
    return run_server(app, sock=sock, drain_timeout=args.drain_timeout, banner=banner)


def cmd_batch(args: argparse.Namespace) -> int:
    try:
        from .batch import run_batch_file
    except ImportError as e:
        return _missing_extra(e)

    if not args.input.is_file():
        raise FileNotFoundError(f"{args.input}: no such file")
    from ..engine import LLM
    from .serving import ServingContext

    directory, kwargs = engine_arguments(args)
    llm = LLM(str(directory), **kwargs)
    ctx = ServingContext.for_engine(llm, args.served_model_name or args.model, directory)
    ctx.strict_model = False  # a batch file names the model its author used; run it on the one loaded
    counts = run_batch_file(llm, ctx, args.input, args.output)
    print(f"wrote {args.output}: {counts['ok']} succeeded, {counts['failed']} failed", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m qwen3.server.cli serve|batch ...` (the same commands without the rest of the CLI)."""
    parser = argparse.ArgumentParser(prog="qwen3")
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
