"""`qwen3 batch`: OpenAI Batch API files run offline on the real engine (demo model, CPU). Greedy results equal
qwen3.generate on the same prompt alone (the plain path); bad lines get an error result in place and the rest run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("pydantic")

import qwen3  # noqa: E402
from qwen3.engine import LLM  # noqa: E402
from qwen3.hub import DEMO_DIR  # noqa: E402
from qwen3.server.batch import run_batch  # noqa: E402
from qwen3.server.serving import ServingContext  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    llm = LLM("demo", device="cpu", dtype=torch.float32, max_num_seqs=16, max_model_len=256)
    ctx = ServingContext.for_engine(llm, "demo", DEMO_DIR)
    ctx.strict_model = False
    return llm, ctx, qwen3.load_model("demo", device="cpu", dtype=torch.float32)


def line(custom_id, url, body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def greedy_reference(model, ids, max_tokens, eos):
    """qwen3.generate alone, cut after the first EOS id (kept, as the engine keeps it in token_ids)."""
    out = qwen3.generate(model, torch.tensor([ids]), max_new_tokens=max_tokens, temperature=0.0)[0].tolist()
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1]
    return out


def test_batch_results_in_order_equal_generate_alone_and_bad_lines_fail_alone(demo):
    llm, ctx, model = demo
    tok = ctx.tokenizer
    chat_messages = [{"role": "user", "content": "Speak, good sir."}]
    lines = [
        line("chat-1", "/v1/chat/completions",
             {"model": "anything", "messages": chat_messages, "max_tokens": 12, "temperature": 0,
              "chat_template_kwargs": {"enable_thinking": False}}),
        "{this is not json",
        line("text-1", "/v1/completions", {"model": "demo", "prompt": "ROMEO:", "max_tokens": 10, "temperature": 0}),
        line("bad-temp", "/v1/completions", {"model": "demo", "prompt": "x", "temperature": -3}),
        json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        line("too-long", "/v1/completions", {"model": "demo", "prompt": list(range(300)), "max_tokens": 4}),
        "",
        line("ids-n2", "/v1/completions",
             {"model": "demo", "prompt": tok.encode("JULIET:"), "max_tokens": 7, "temperature": 0, "n": 2}),
    ]  # fmt: skip
    results = run_batch(llm, ctx, lines, use_tqdm=False)
    assert [r["custom_id"] for r in results] == ["chat-1", None, "text-1", "bad-temp", "bad-url", "too-long", "ids-n2"]
    statuses = [r["response"] and r["response"]["status_code"] for r in results]
    assert statuses == [200, None, 200, 400, None, 400, 200]
    for r in results:
        assert r["id"].startswith("batch_req_")
        assert (r["error"] is None) == (r["response"] is not None)
    assert "JSON" in results[1]["error"]["message"] and "url" in results[4]["error"]["message"]
    assert results[3]["response"]["body"]["error"]["param"] == "temperature"
    assert "context length" in results[5]["response"]["body"]["error"]["message"]

    eos = set(tok.eos_token_ids)
    prompt = tok.apply_chat_template(chat_messages, tokenize=True, enable_thinking=False)
    expected = greedy_reference(model, prompt, 12, eos)
    body = results[0]["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == len(expected)
    text = tok.decode([t for t in expected if t not in eos])
    assert body["choices"][0]["message"]["content"] == text.strip("\n")

    body = results[2]["response"]["body"]
    expected = greedy_reference(model, tok.encode("ROMEO:"), 10, eos)
    assert body["choices"][0]["text"] == tok.decode([t for t in expected if t not in eos])
    assert body["usage"]["completion_tokens"] == len(expected)

    body = results[6]["response"]["body"]
    expected = tok.decode([t for t in greedy_reference(model, tok.encode("JULIET:"), 7, eos) if t not in eos])
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [expected, expected]
    assert llm.block_manager.usage() == 0


def test_qwen3_batch_command(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        line("a", "/v1/completions", {"model": "demo", "prompt": "KING:", "max_tokens": 5, "temperature": 0}) + "\n"
        + "[1, 2]\n"
        + line("b", "/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "Hi"}],
                                             "max_tokens": 5}) + "\n"
    )  # fmt: skip
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "qwen3.cli", "batch", "-i", str(requests), "-o", str(out), "--model",
               "demo", "--device", "cpu", "--max-model-len", "256", "--max-num-seqs", "8"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a small model on a shared CPU: no oversubscription
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["a", None, "b"]
    assert results[0]["response"]["body"]["usage"]["completion_tokens"] == 5
    assert results[2]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    assert "2 succeeded, 1 failed" in run.stderr


@pytest.mark.parametrize("flags, message", [
    (["--compile"], "LLM: compile=True needs CUDA and the Triton kernels"),
    (["--kv-cache-dtype", "fp8", "--tp", "2"], "kv_cache_dtype='fp8' is not supported with tensor parallelism"),
])  # fmt: skip
def test_engine_flags_reach_the_engine(tmp_path, flags, message):
    """--compile and --kv-cache-dtype go to qwen3.LLM: the CPU's refusals come back as one line and status 2."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("")
    command = [sys.executable, "-m", "qwen3.cli", "batch", "-i", str(requests), "-o", str(tmp_path / "out.jsonl"),
               "--model", "demo", "--device", "cpu", *flags]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
