"""`qwen3 serve` end to end: real server processes on 127.0.0.1 (tests/server_main.py, and the `qwen3 serve` command)
running the real engine on the CPU, driven by the official openai client (sync and async) and raw HTTP (httpx).

The scripted server's model answers chosen requests with chosen text (see server_main.py), which pins down
reasoning, tool calls and malformed calls; the demo model checks that 32 concurrent greedy streams each equal the
same request run alone. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from qwen3 import load_tokenizer  # noqa: E402
from qwen3.hub import DEMO_DIR  # noqa: E402

HERE = Path(__file__).parent
KEY = "sk-test-key"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

TOOLS2 = [
    *TOOLS,
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Time in a zone",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
        },
    },
]

# (request, reply): the scripted model answers each request (greedy or not) with exactly this text, then EOS.
REASONING = (
    {"messages": [{"role": "user", "content": "think please"}]},
    "<think>\nI ponder.\nStill pondering.\n</think>\n\nThe answer is 42.",
)
NO_THINK = (
    {
        "messages": [{"role": "user", "content": "answer without thinking, briefly"}],
        "chat_template_kwargs": {"enable_thinking": False},
    },
    "Plain answer.",
)
TOOL = (
    {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": TOOLS},
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
)
MALFORMED = (
    {"messages": [{"role": "user", "content": "Break the tool call format now, please"}], "tools": TOOLS},
    "<tool_call>\n{name: get_weather}\n</tool_call>",
)
XSS = (
    {"messages": [{"role": "user", "content": "xss"}]},
    'Look: <img src=x onerror="window.__xss=1"> and <script>window.__xss=2</script> **bold** done',
)
CRASH = ({"messages": [{"role": "user", "content": "fail in the middle of your answer"}]}, "Half an answer, then")
TWO_CALLS = (
    {
        "messages": [{"role": "user", "content": "The weather in Paris and the time in Tokyo, both please"}],
        "tools": TOOLS2,
    },
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2, 3], "note": "a long note, '
    'so that the arguments take many tokens"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
    '{"zone": "Asia/Tokyo"}}\n</tool_call>',
)
# tool_choice forces a call (prompts of other lengths, so that the scripts do not overlap): the reply is the model's
# continuation after the prompt's `<tool_call>\n{"name": "`
# ("required") or `... "arguments":` (a named function)
REQUIRED = (
    {
        "messages": [{"role": "user", "content": "Use a tool" + ", now" * 95}],
        "tools": TOOLS2,
        "tool_choice": "required",
    },
    'get_time", "arguments": {"zone": "UTC"}}\n</tool_call>',
)
NAMED = (
    {
        "messages": [{"role": "user", "content": "Weather for Oslo, through the named tool" + ", please" * 105}],
        "tools": TOOLS2,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    },
    ' {"city": "Oslo"}}\n</tool_call>',
)
SCRIPTS = [REASONING, NO_THINK, TOOL, MALFORMED, XSS, CRASH, TWO_CALLS, REQUIRED, NAMED]
# The scripted model recognises a request by its prompt's length and last token (all a decode step sees), so
# requests meant to get its unscripted (endless, pseudo-random) continuation use this longer prompt.
UNSCRIPTED = [{"role": "user", "content": "Tell me a long story about " + "a dragon and a knight, " * 8}]


class Server:
    """A server process and its URL; stopped (and its output shown on failure) at teardown."""

    def __init__(self, command: list[str], tmp: Path, timeout: float = 120, new_session: bool = False) -> None:
        self.log = tmp / "server.log"
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "w"),
            text=True,
            cwd=HERE.parent,
            start_new_session=new_session,  # its own process group, as systemd or a terminal gives it
            # small models on a shared CPU: one intra-op thread each, no oversubscription
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )
        deadline, line = time.monotonic() + timeout, ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if match := re.search(r"http://127\.0\.0\.1:(\d+)", line):
                    self.url = match.group(0)
                    return
        self.stop()
        raise RuntimeError(f"server did not start: {line!r}\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), timeout=60, max_retries=0, **kwargs
        )

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(qwen3:\w+)\{[^}]*\} (\S+)$", text, re.M)}

    def wait_idle(self, timeout: float = 20) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.metrics()
            if m["qwen3:num_requests_running"] == 0 and m["qwen3:num_requests_waiting"] == 0:
                return m
            time.sleep(0.1)
        raise AssertionError(f"requests still running after {timeout} s: {m}")


def scripted_server(tmp: Path, *args: str) -> Server:
    spec = tmp / "spec.json"
    spec.write_text(json.dumps([{"request": r, "reply": reply, "crash": (r, reply) == CRASH} for r, reply in SCRIPTS]))
    return Server([sys.executable, str(HERE / "server_main.py"), "--spec", str(spec), *args], tmp)


async def streamed_completion(client, **request):
    """(text, finish_reason, usage) of a greedy streamed completion with include_usage, joined from its chunks."""
    text, finish, usage = "", None, None
    stream = await client.completions.create(
        **request, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
    return text, finish, usage


def test_unscripted_prompt_is_unlike_every_script(tok):
    from qwen3.server.protocol import ChatCompletionRequest
    from qwen3.server.serving import ServingContext, render_chat_prompt

    ctx = ServingContext(tok, "scripted", 2048, 4096)
    lengths = {
        len(tok.encode(render_chat_prompt(ctx, ChatCompletionRequest(model="scripted", **r)), allow_special=True))
        for r, _ in SCRIPTS
    }
    assert len(tok.apply_chat_template(UNSCRIPTED, tokenize=True)) not in lengths


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_DIR)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = scripted_server(tmp_path_factory.mktemp("scripted"))
    yield s
    assert s.stop() == 0


def chat(client, request, **kwargs):
    return client.chat.completions.create(model="scripted", **{**request, **kwargs})


def collect_stream(stream):
    """reasoning, content, tool calls (by index), finish reasons and usage of a streamed chat completion."""
    reasoning, content, calls, finish, usage = "", "", {}, [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    return reasoning, content, calls, finish, usage


def test_chat_reasoning_usage_and_stream_equals_non_stream(server, tok):
    client = server.client()
    request, reply = REASONING
    r = chat(client, request)
    message = r.choices[0].message
    assert message.reasoning_content == "I ponder.\nStill pondering." == message.model_extra["reasoning"]
    assert message.content == "The answer is 42." and r.choices[0].finish_reason == "stop"
    prompt = tok.apply_chat_template(request["messages"], tokenize=True)
    completion_tokens = len(tok.encode(reply, allow_special=True)) + 1  # + the EOS id (<|im_end|>)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), completion_tokens)
    assert r.usage.total_tokens == len(prompt) + completion_tokens
    stream = chat(client, request, stream=True, stream_options={"include_usage": True})
    reasoning, content, calls, finish, usage = collect_stream(stream)
    assert (reasoning, content, calls, finish) == (message.reasoning_content, message.content, {}, ["stop"])
    assert (usage.prompt_tokens, usage.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)


def test_chat_template_kwargs_turn_thinking_off(server, tok):
    request, reply = NO_THINK
    r = server.client().chat.completions.create(model="scripted", **_chat_kwargs(request))
    prompt = tok.apply_chat_template(request["messages"], tokenize=True, enable_thinking=False)
    assert r.usage.prompt_tokens == len(prompt) > len(tok.apply_chat_template(request["messages"], tokenize=True))
    assert r.choices[0].message.content == reply and r.choices[0].message.reasoning_content is None


def _chat_kwargs(request):
    """openai's create() takes tools as a keyword and the rest of our extras in extra_body."""
    extra = {k: v for k, v in request.items() if k not in ("messages", "tools")}
    kwargs = {"messages": request["messages"], "extra_body": extra}
    if "tools" in request:
        kwargs["tools"] = request["tools"]
    return kwargs


def test_tool_calls_non_stream_and_stream(server):
    client = server.client()
    request, _ = TOOL
    r = client.chat.completions.create(model="scripted", **_chat_kwargs(request))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    stream = client.chat.completions.create(model="scripted", stream=True, **_chat_kwargs(request))
    _, content, calls, finish, _ = collect_stream(stream)
    assert content == "Let me check." and finish == ["tool_calls"]
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("chatcmpl-tool-")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    # tool_choice "none": the tags stay text
    r = client.chat.completions.create(model="scripted", tool_choice="none", max_tokens=12, **_chat_kwargs(request))
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"


def collect_tool_call_deltas(stream):
    """The tool_calls deltas of a streamed chat completion, in order, as (index, id, type, name, arguments)."""
    deltas = []
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                function = call.function
                deltas.append((call.index, call.id, call.type, function.name, function.arguments))
    return deltas


def test_tool_call_arguments_stream_incrementally(server):
    client = server.client()
    request, _ = TWO_CALLS
    r = client.chat.completions.create(model="scripted", **_chat_kwargs(request))
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
    assert calls == [
        ("get_weather", '{"city": "Paris", "days": [1, 2, 3], "note": "a long note, so that the arguments take many '
         'tokens"}'),
        ("get_time", '{"zone": "Asia/Tokyo"}'),
    ]  # fmt: skip
    deltas = collect_tool_call_deltas(client.chat.completions.create(model="scripted", stream=True,
                                                                     **_chat_kwargs(request)))  # fmt: skip
    for index, (name, arguments) in enumerate(calls):
        mine = [d for d in deltas if d[0] == index]
        # OpenAI's shape: the first delta has the id, type and name with empty arguments; the rest only arguments
        assert mine[0][1].startswith("chatcmpl-tool-") and mine[0][2:] == ("function", name, "")
        assert all(d[1:4] == (None, None, None) for d in mine[1:])
        assert "".join(d[4] for d in mine[1:]) == arguments
    assert len([d for d in deltas if d[0] == 0]) > 3  # the long arguments came in several pieces
    assert [d[0] for d in deltas] == sorted(d[0] for d in deltas)  # call 1 starts after call 0 ends


def test_tool_choice_required_and_named_force_a_call(server, tok):
    client = server.client()
    for (request, reply), name, arguments in [(REQUIRED, "get_time", '{"zone": "UTC"}'),
                                              (NAMED, "get_weather", '{"city": "Oslo"}')]:  # fmt: skip
        r = client.chat.completions.create(model="scripted", **_chat_kwargs(request))
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [(name, arguments)]
        # the prompt: the template's, the think block closed empty, then the start of the call
        forced = request["tool_choice"]
        start = '<tool_call>\n{"name": "'
        if isinstance(forced, dict):
            start += f'{name}", "arguments":'
        template = tok.apply_chat_template(request["messages"], tools=TOOLS2)
        prompt = tok.encode(template + "<think>\n\n</think>\n\n" + start, allow_special=True)
        assert r.usage.prompt_tokens == len(prompt)
        assert r.usage.completion_tokens == len(tok.encode(reply, allow_special=True)) + 1
        _, content, calls, finish, _ = collect_stream(
            client.chat.completions.create(model="scripted", stream=True, **_chat_kwargs(request))
        )
        assert (content, finish) == ("", ["tool_calls"])
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [(name, arguments)]
    msgs = [{"role": "user", "content": "hi"}]
    for body in [
        {"tools": TOOLS2, "tool_choice": {"type": "function", "function": {"name": "no_such_tool"}}},
        {"tool_choice": "required"},
        {"tools": TOOLS2, "tool_choice": "sometimes"},
    ]:
        response = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                              json={"model": "scripted", "messages": msgs, **body})  # fmt: skip
        assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice", response.text


def test_malformed_tool_call_comes_back_as_content(server):
    client = server.client()
    request, reply = MALFORMED
    r = client.chat.completions.create(model="scripted", **_chat_kwargs(request))
    assert r.choices[0].message.content == reply and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    _, content, calls, finish, _ = collect_stream(
        client.chat.completions.create(model="scripted", stream=True, **_chat_kwargs(request))
    )
    assert (content, calls, finish) == (reply, {}, ["stop"])


def test_completions_async_client_text_ids_n_logprobs(server, tok):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)
        ids = tok.encode("To be, or not to be")
        whole = await client.completions.create(model="scripted", prompt=ids, max_tokens=9, temperature=0)
        as_text = await client.completions.create(
            model="scripted", prompt="To be, or not to be", max_tokens=9, temperature=0
        )
        assert whole.choices[0].text == as_text.choices[0].text and whole.choices[0].finish_reason == "length"
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), 9)
        text, finish, usage = await streamed_completion(client, model="scripted", prompt=ids, max_tokens=9)
        assert (text, finish) == (whole.choices[0].text, "length") and usage.completion_tokens == 9
        several = await client.completions.create(
            model="scripted", prompt=[ids, ids[:3]], max_tokens=4, n=2, temperature=0, logprobs=2
        )
        assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]
        for c in several.choices:
            assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 4
            assert all(len(top) == 2 for top in c.logprobs.top_logprobs)
            assert "".join(c.logprobs.tokens) == c.text
        assert (
            several.usage.completion_tokens == 16 and several.usage.prompt_tokens == len(ids) + 3
        )  # once per prompt, as vLLM
        models = await client.models.list()
        assert [m.id for m in models.data] == ["scripted"]
        await client.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_errors_have_openai_shape_and_status(server):
    url = server.url

    def post(path, body, **kwargs):
        return httpx.post(url + path, timeout=30, **({"json": body} if body is not None else {}), **kwargs)

    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (post("/v1/chat/completions", None, content=b"{not json"), 400, None),
        (post("/v1/chat/completions", None, content=b"[1, 2]"), 400, None),
        (post("/v1/chat/completions", {"model": "scripted"}), 400, "messages"),
        (post("/v1/chat/completions", {"model": "scripted", "messages": msgs, "temperature": -1}), 400, "temperature"),
        (post("/v1/chat/completions", {"model": "scripted", "messages": msgs, "top_p": "high"}), 400, "top_p"),
        (post("/v1/chat/completions", {"model": "scripted", "messages": msgs, "stop": [""]}), 400, "stop"),
        (post("/v1/chat/completions", {"model": "scripted", "messages": msgs, "max_tokens": 5000}), 400, "max_tokens"),
        (post("/v1/chat/completions", {"model": "scripted", "messages": msgs, "top_logprobs": 2}), 400, "top_logprobs"),
        (
            post("/v1/chat/completions", {"model": "scripted", "messages": [{"role": "robot", "content": "x"}]}),
            400,
            "messages[0].role",
        ),
        (post("/v1/completions", {"model": "scripted", "prompt": "x " * 1100}), 400, "prompt"),
        (post("/v1/completions", {"model": "scripted", "prompt": [1, 99999]}), 400, "prompt"),
        (post("/v1/completions", {"model": "scripted", "prompt": "hi", "n": 0}), 400, "n"),
        (post("/v1/chat/completions", {"model": "gpt-4o", "messages": msgs}), 404, "model"),
        (httpx.get(url + "/v1/nothing-here", timeout=30), 404, None),
        (httpx.get(url + "/v1/chat/completions", timeout=30), 405, None),
    ]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert "Traceback" not in response.text and "\n" not in error["message"]
        if param is not None:
            assert error["param"] == param, error
    # the openai client sees the same errors as its exception types
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=msgs)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client().chat.completions.create(model="scripted", messages=msgs, max_tokens=100_000)
    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}


def test_chat_logprobs_and_n(server, tok):
    request, reply = REASONING
    r = chat(server.client(), request, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == reply + "<|im_end|>"  # the scripted tokens, EOS included
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and t.logprob == pytest.approx(0)
        assert t.top_logprobs[1].logprob < -50  # the script's logits: 100 for its token, 0 for the others
    stream = chat(server.client(), {"messages": UNSCRIPTED}, n=2, max_tokens=7, temperature=0, stream=True)
    texts, finish = {0: "", 1: ""}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish.get(c.index)
    whole = chat(server.client(), {"messages": UNSCRIPTED}, max_tokens=7, temperature=0)
    assert texts == {0: whole.choices[0].message.content, 1: whole.choices[0].message.content}
    assert finish == {0: "length", 1: "length"}


def test_a_failing_model_step_is_an_error_event_then_done(server):
    request, _ = CRASH
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json={"model": "scripted", "stream": True, **request}, timeout=60
    ) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "server_error" and "Traceback" not in lines[-2]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "scripted", **request}, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    # the server keeps serving
    assert chat(server.client(), REASONING[0]).choices[0].message.content == "The answer is 42."


def test_disconnect_aborts_and_frees_the_request(server):
    body = {"model": "scripted", "messages": UNSCRIPTED, "max_tokens": 900}
    # streaming: read a few chunks, check it runs, then drop the connection
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            running = server.metrics()
    assert running["qwen3:num_requests_running"] == 1 and running["qwen3:kv_cache_usage_perc"] > 0
    idle = server.wait_idle()
    assert idle["qwen3:kv_cache_usage_perc"] == 0  # blocks freed (prefix-cached blocks count as free)
    # non-streaming: the client gives up long before the 900 tokens are done; the rest is never generated
    before = server.metrics()["qwen3:generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)
    after = server.wait_idle()
    assert after["qwen3:kv_cache_usage_perc"] == 0
    assert after["qwen3:generation_tokens_total"] - before < 900


def test_metrics_page(server):
    chat(server.client(), REASONING[0], stream=True).close()
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in (
        "qwen3:num_requests_running",
        "qwen3:num_requests_waiting",
        "qwen3:kv_cache_usage_perc",
        "qwen3:prompt_tokens_total",
        "qwen3:generation_tokens_total",
        "qwen3:time_to_first_token_seconds_bucket",
        "qwen3:inter_token_latency_seconds_bucket",
    ):
        assert re.search(rf"^{name}\{{", text, re.M), name


def test_api_key_rate_limit_and_sigterm_drain(tmp_path):
    s = scripted_server(tmp_path, "--api-key", KEY, "--max-num-seqs", "1", "--max-waiting", "0")
    try:
        msgs = UNSCRIPTED
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # open without a key
        assert httpx.get(s.url + "/", timeout=10).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.get(s.url + "/v1/models", headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").chat.completions.create(model="scripted", messages=msgs, max_tokens=2)
        client = s.client(api_key=KEY)
        assert (
            client.chat.completions.create(model="scripted", messages=msgs, max_tokens=2).usage.completion_tokens == 2
        )

        # one slot, nobody may wait: a second request while the first runs gets 429 with Retry-After
        headers = {"Authorization": f"Bearer {KEY}"}
        long = {"model": "scripted", "messages": msgs, "max_tokens": 120, "stream": True}
        with httpx.Client(timeout=60, headers=headers) as http:
            with http.stream("POST", s.url + "/v1/chat/completions", json=long) as r:
                lines = r.iter_lines()
                next(lines)
                busy = http.post(s.url + "/v1/chat/completions", json={**long, "stream": False})
                assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
                assert busy.json()["error"]["type"] == "rate_limit_error"
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(model="scripted", messages=msgs, max_tokens=2)
                # SIGTERM mid-stream: the stream still completes, then the process exits 0
                s.proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
        events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=5)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    s = Server(
        [
            sys.executable,
            "-m",
            "qwen3.cli",
            "serve",
            "--model",
            "demo",
            "--port",
            "0",
            "--max-num-seqs",
            "64",
            "--device",
            "cpu",
            "--stream-interval",  # chunks of 2 tokens: merged increments through the whole HTTP path
            "2",
        ],
        tmp_path_factory.mktemp("demo"),
    )
    yield s
    assert s.stop() == 0


def test_qwen3_serve_demo_32_concurrent_streams_equal_their_solo_answers(demo_server):
    prompts = [
        f"{name}:" for name in ("ROMEO", "JULIET", "HAMLET", "OPHELIA", "KING LEAR", "CORDELIA", "MACBETH", "PORTIA")
    ]
    requests = [(p, k) for p in prompts for k in range(4)]  # 32 requests: 8 prompts x 4 lengths
    client = demo_server.client()
    solo = {}
    for prompt, k in requests:
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=6 + 3 * k, temperature=0)
        solo[prompt, k] = (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens)

    async def one(client, prompt, k):
        text, finish, usage = await streamed_completion(client, model="demo", prompt=prompt, max_tokens=6 + 3 * k)
        return text, finish, usage.completion_tokens

    async def main():
        client = openai.AsyncOpenAI(base_url=demo_server.url + "/v1", api_key="none", timeout=120, max_retries=0)
        results = await asyncio.gather(*(one(client, p, k) for p, k in requests))
        await client.close()
        return results

    results = asyncio.run(asyncio.wait_for(main(), 180))
    assert len(results) == 32
    for (prompt, k), got in zip(requests, results, strict=True):
        assert got == solo[prompt, k], (prompt, k)
    assert demo_server.wait_idle()["qwen3:kv_cache_usage_perc"] == 0
    # with --stream-interval 2 a chunk carries several tokens; its logprobs list every one of them
    stream = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=9, temperature=0, logprobs=1,
                                       stream=True)  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    assert "".join(c.text for c in chunks) == "".join(tokens) == solo["ROMEO:", 1][0]
    assert len(tokens) == 9 and max(len(c.logprobs.tokens) for c in chunks if c.logprobs) >= 2
    # stop strings: the text ends right before the first one, finish_reason "stop"
    text = solo["ROMEO:", 3][0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    r = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=15, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    # a seed makes sampling reproducible; the n choices of one request differ (seeds seed, seed + 1)
    sampled = [client.completions.create(model="demo", prompt="HAMLET:", max_tokens=16, temperature=1.0, seed=7, n=2)
               for _ in range(2)]  # fmt: skip
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert sampled[0].choices[0].text != sampled[0].choices[1].text
    # chat through the page's route works on the demo model too
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Speak"}], max_tokens=5)
    assert r.usage.completion_tokens <= 5 and r.choices[0].message.role == "assistant"


def assert_group_sigterm_drains(s: Server) -> None:
    """SIGTERM to the server's whole process group mid-stream: the stream still ends with its last chunk and
    [DONE], the server exits 0, and every process of its group (engine, HTTP processes) is gone after it."""
    body = {"model": "demo", "prompt": "ROMEO:", "max_tokens": 60, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.Client(timeout=60) as http, http.stream("POST", s.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        os.killpg(s.proc.pid, signal.SIGTERM)
        rest = [line for line in lines if line]
    events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(60) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(s.proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("a process of the server's group is still running")


def test_sigterm_to_the_whole_process_group_drains(tmp_path):
    """systemd, `timeout` and `kill -TERM -PGID` signal every process of the group, the engine process too: it
    must leave the stopping to the server, which finishes the stream in flight, stops the engine and exits 0."""
    command = [sys.executable, "-m", "qwen3.cli", "serve", "--model", "demo", "--port", "0", "--device", "cpu"]
    s = Server(command, tmp_path, new_session=True)
    try:
        assert_group_sigterm_drains(s)
    finally:
        s.stop()


def test_qwen3_serve_with_two_http_processes(tmp_path):
    """`--api-server-count 2`: two HTTP processes on one socket over one engine process. Concurrent streams equal
    their solo answers, /metrics counts every request whichever process served it, a bad flag is a clear error,
    and SIGTERM to the whole group drains the stream in flight and leaves no process behind."""
    bad = subprocess.run([sys.executable, "-m", "qwen3.cli", "serve", "--model", "demo", "--api-server-count", "0"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "--api-server-count: must be at least 1, found 0" in bad.stderr
    command = [sys.executable, "-m", "qwen3.cli", "serve", "--model", "demo", "--port", "0", "--device", "cpu",
               "--api-server-count", "2"]  # fmt: skip
    s = Server(command, tmp_path, new_session=True)
    try:
        prompts = [f"{name}:" for name in ("ROMEO", "JULIET", "HAMLET", "OPHELIA")]
        requests = [(p, 4 + 3 * k) for p in prompts for k in range(4)]
        client = s.client()
        solo = {}
        for prompt, max_tokens in requests:
            r = client.completions.create(model="demo", prompt=prompt, max_tokens=max_tokens, temperature=0)
            solo[prompt, max_tokens] = (r.choices[0].text, r.usage.completion_tokens)

        async def one(prompt, max_tokens):  # a client (and a connection) each: the kernel spreads them out
            async with openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", timeout=120, max_retries=0) as c:
                text, _, usage = await streamed_completion(c, model="demo", prompt=prompt, max_tokens=max_tokens)
                return text, usage.completion_tokens

        async def main():
            return await asyncio.gather(*(one(p, m) for p, m in requests))

        results = asyncio.run(asyncio.wait_for(main(), 180))
        assert results == [solo[key] for key in requests]
        idle = s.wait_idle()
        assert idle["qwen3:e2e_request_latency_seconds_count"] == 2 * len(requests)
        assert idle["qwen3:generation_tokens_total"] == 2 * sum(tokens for _, tokens in solo.values())

        assert_group_sigterm_drains(s)
    finally:
        s.stop()
