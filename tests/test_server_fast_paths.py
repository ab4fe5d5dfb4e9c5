"""The server's per-token fast paths against the plain paths beside them: pre-split SSE events are byte for byte
`json.dumps` of the whole chunk, and the lock-free latency histograms expose exactly what prometheus_client's
Histogram exposes for the same observations."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")
prometheus_client = pytest.importorskip("prometheus_client")

from qwen3 import load_tokenizer  # noqa: E402
from qwen3.hub import DEMO_DIR  # noqa: E402
from qwen3.server.app import ChunkWriter, _sse, chat_choice_json, completion_choice_json  # noqa: E402
from qwen3.server.metrics import _ITL_BUCKETS, Metrics  # noqa: E402
from qwen3.server.serving import ServingContext, envelope  # noqa: E402

ALPHABET = 'ab "\\/\n\t\r\x00\x1f\x7féü€😀<>&\u2028'


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(12)))


def test_sse_events_equal_json_dumps_of_the_whole_chunk():
    rng = random.Random(0)
    ctx = ServingContext(load_tokenizer(DEMO_DIR), 'model "quoted" ü', 64, 4096)
    for kind in ("text_completion", "chat.completion.chunk"):
        writer = ChunkWriter(ctx, kind, "cmpl-" + random_text(rng), 1_700_000_000)
        for _ in range(200):
            index, finish = rng.randrange(20), rng.choice([None, "stop", "length", "tool_calls"])
            logprobs = rng.choice([None, {"content": [{"token": random_text(rng), "logprob": -rng.random()}]}])
            if kind == "text_completion":
                text = random_text(rng)
                choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
                fast = completion_choice_json(index, text, logprobs, finish)
            else:
                text, other = random_text(rng), random_text(rng)
                delta = rng.choice(
                    [
                        {"content": text},
                        {"reasoning_content": text, "reasoning": text},
                        {"reasoning_content": text, "reasoning": other},
                        {"reasoning_content": text, "reasoning": text, "content": other},
                        {"role": "assistant", "content": ""},
                        {},
                        {"tool_calls": [{"index": 0, "function": {"arguments": text}}]},
                    ]
                )
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                fast = chat_choice_json(index, delta, logprobs, finish)
            plain = _sse(envelope(ctx, kind, writer.envelope([])["id"], 1_700_000_000, [choice]))
            assert writer.event(fast) == plain
            assert json.loads(plain[6:])["choices"][0] == choice


class _Stats:
    num_running = num_waiting = num_preemptions = prompt_tokens_total = generation_tokens_total = 0
    kv_cache_usage = 0.0


def test_latency_histograms_expose_what_prometheus_client_does():
    rng = random.Random(1)
    metrics = Metrics(lambda: _Stats, "m")
    registry = prometheus_client.CollectorRegistry()
    reference = prometheus_client.Histogram(
        "qwen3:inter_token_latency_seconds",
        "Time between two streamed increments of a request.",
        ["model_name"],
        buckets=_ITL_BUCKETS,
        registry=registry,
    ).labels("m")
    values = [rng.expovariate(rng.choice([1, 50, 1000])) for _ in range(2000)] + list(_ITL_BUCKETS) + [0.0, 1e9]
    for v in values:
        metrics.inter_token_latency.observe(v)
        reference.observe(v)
    ours = [line for line in metrics.render().decode().splitlines() if "inter_token_latency" in line]
    theirs = [line for line in prometheus_client.generate_latest(registry).decode().splitlines()
              if "_created" not in line]  # fmt: skip
    assert ours == theirs and len(ours) == len(_ITL_BUCKETS) + 5  # HELP, TYPE, buckets with +Inf, count, sum


def test_histograms_shared_by_several_processes_sum_their_rows():
    """Behind `--api-server-count N` each HTTP process observes into its own row of shared memory and any of them
    renders the sum: the same page as one process that observed everything. (The rows are written here from one
    process; front_ends.py hands the same arrays to N spawned ones.)"""
    from qwen3.server.metrics import shared_histograms

    rng = random.Random(2)
    arrays = shared_histograms(3)
    rows = [Metrics(lambda: _Stats, "m", (arrays, row)) for row in range(3)]
    single = Metrics(lambda: _Stats, "m")
    for _ in range(3000):
        value = rng.expovariate(rng.choice([1, 50, 1000]))
        kind = rng.choice(["time_to_first_token", "inter_token_latency", "e2e_latency"])
        getattr(rng.choice(rows), kind).observe(value)
        getattr(single, kind).observe(value)
    pages = [m.render().decode() for m in rows]
    assert pages[0] == pages[1] == pages[2]
    both = (pages[0], single.render().decode())
    ours, theirs = ([line for line in page.splitlines() if "_sum" not in line] for page in both)
    assert ours == theirs and sum("_count" in line for line in ours) == 3
    sums = [[float(line.split()[-1]) for line in page.splitlines() if "_sum" in line] for page in both]
    assert sums[0] == pytest.approx(sums[1], rel=1e-12)  # added in another order
