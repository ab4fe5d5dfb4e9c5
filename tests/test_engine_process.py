"""AsyncLLM.spawn: the engine in a process of its own behaves as the in-process AsyncLLM. Streams add up to
LLM.generate's outputs in this process (greedy, seeded, stop strings, logprobs), errors surface on the first await,
an abort frees the blocks (seen through stats, which come from the engine process), a model that cannot be built
raises at spawn, and an engine process that dies fails the requests in flight instead of hanging them."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

from conftest import assert_streams_add_up, collect
from qwen3.engine import LLM, AsyncLLM
from qwen3.sampling import SamplingParams

KV_TOKENS = 4096


@pytest.fixture(scope="module")
def local():
    return LLM("demo", kv_cache_tokens=KV_TOKENS)


def random_prompts(lengths, vocab, seed) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


async def wait_for(engine: AsyncLLM, condition) -> None:
    for _ in range(500):
        if condition(engine.stats()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine stats never met the condition: {engine.stats()}")


def test_spawned_streams_equal_generate_in_this_process(local):
    prompts = random_prompts([5, 17, 9, 30], local.config.vocab_size, seed=11)
    prompts.append("To be, or not to be")  # a text prompt: tokenized in the engine process
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (12, 5, 20, 9, 16)]
    params[1] = SamplingParams(temperature=0.8, seed=3, max_tokens=7, ignore_eos=True)
    params[2] = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)
    expected = local.generate(prompts, params, use_tqdm=False)
    free = expected[3].text
    stop = free[4:7]
    params[3] = SamplingParams(temperature=0.0, max_tokens=9, stop=[stop])
    expected[3] = local.generate([prompts[3]], params[3], use_tqdm=False)[0]
    assert stop in free and expected[3].finish_reason == "stop"

    async def main():
        engine = AsyncLLM.spawn(LLM, "demo", kv_cache_tokens=KV_TOKENS)
        try:
            assert engine.max_model_len == local.max_model_len and engine.vocab_size == local.config.vocab_size
            assert engine.tokenizer.encode("hello") == local.tokenizer.encode("hello")
            streams = await asyncio.gather(*(collect(engine, p, sp) for p, sp in zip(prompts, params, strict=True)))
            await wait_for(engine, lambda s: s.num_running == 0 and s.kv_cache_usage == 0)
            return streams, engine.stats()
        finally:
            await engine.shutdown()

    streams, stats = asyncio.run(main())
    assert_streams_add_up(streams, expected)
    logprobs = [lp for o in streams[2] for lp in o.new_logprobs]
    assert [lp.token_id for lp in logprobs] == expected[2].token_ids
    assert [lp.logprob for lp in logprobs] == pytest.approx([lp.logprob for lp in expected[2].logprobs], abs=1e-5)
    assert stats.generation_tokens_total == sum(len(w.token_ids) for w in expected)
    assert stats.prompt_tokens_total == sum(len(w.prompt_token_ids) for w in expected)


def test_spawned_errors_abort_and_shutdown(local):
    vocab, limit = local.config.vocab_size, local.max_model_len
    prompt = random_prompts([8], vocab, seed=4)[0]

    async def main():
        engine = AsyncLLM.spawn(LLM, "demo", kv_cache_tokens=KV_TOKENS)
        try:
            with pytest.raises(ValueError, match=f"prompt has {limit} tokens; max_model_len is {limit}"):
                await collect(engine, [1] * limit, SamplingParams(max_tokens=1))
            with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary"):
                await collect(engine, [vocab], SamplingParams(max_tokens=1))
            # a request that never ends on its own: aborted by id, its blocks come back
            long = SamplingParams(temperature=0.0, max_tokens=limit - 9, ignore_eos=True)
            stream = engine.generate(prompt, long, request_id="r")
            first = await anext(stream)
            assert first.new_token_ids and not first.finished
            with pytest.raises(ValueError, match="already running"):
                await anext(engine.generate(prompt, long, request_id="r"))
            await wait_for(engine, lambda s: s.num_running == 1 and s.kv_cache_usage > 0)
            engine.abort("r")
            rest = [out async for out in stream]
            assert rest[-1].finished and rest[-1].finish_reason == "abort"
            await wait_for(engine, lambda s: s.num_running == 0 and s.kv_cache_usage == 0)
            # the id is free again; closing an iterator early aborts too
            stream = engine.generate(prompt, long, request_id="r")
            await anext(stream)
            await stream.aclose()
            await wait_for(engine, lambda s: s.num_running == 0 and s.kv_cache_usage == 0)
            # shutdown ends what is in flight with "abort"
            stream = engine.generate(prompt, long, request_id="s")
            await anext(stream)
            await engine.shutdown()
            rest = [out async for out in stream]
            assert rest[-1].finish_reason == "abort"
            assert not engine._core.process.is_alive() and engine._core.process.exitcode == 0
            with pytest.raises(RuntimeError, match="shut down"):
                await anext(engine.generate(prompt, long))
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_spawn_raises_what_building_the_model_raised(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        AsyncLLM.spawn(LLM, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="stream_interval"):
        AsyncLLM.spawn(LLM, "demo", stream_interval=0)


def test_a_dead_engine_process_fails_its_requests(local):
    prompt = random_prompts([8], local.config.vocab_size, seed=5)[0]
    long = SamplingParams(temperature=0.0, max_tokens=local.max_model_len - 9, ignore_eos=True)

    async def main():
        engine = AsyncLLM.spawn(LLM, "demo", kv_cache_tokens=KV_TOKENS)
        try:
            stream = engine.generate(prompt, long)
            await anext(stream)
            os.kill(engine._core.process.pid, signal.SIGKILL)
            with pytest.raises(RuntimeError, match=f"engine process has exited \\(exit code {-signal.SIGKILL}\\)"):
                async for _ in stream:
                    pass
            with pytest.raises(RuntimeError, match="engine process has exited"):
                await anext(engine.generate(prompt, long))
            assert engine.dead == f"the engine process has exited (exit code {-signal.SIGKILL})"
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_health_is_503_once_the_engine_process_is_gone():
    from fastapi.testclient import TestClient

    from qwen3.server.app import create_app
    from qwen3.server.serving import ServingContext

    engine = AsyncLLM.spawn(LLM, "demo", kv_cache_tokens=KV_TOKENS)
    assert engine.dead is None
    with TestClient(create_app(engine, ServingContext.for_engine(engine, "demo"))) as client:
        assert client.get("/health").json() == {"status": "ok"}
        os.kill(engine._core.process.pid, signal.SIGKILL)
        engine._core._reader.join(30)
        response = client.get("/health")
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "engine_dead" and f"exit code {-signal.SIGKILL}" in error["message"]
        # requests get the same 503, not a 500 with a traceback in the log each
        response = client.post("/v1/completions", json={"model": "demo", "prompt": "ROMEO:", "max_tokens": 4})
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"


def test_spawned_engine_with_tensor_parallel_workers():
    """The engine process is not a daemon, so a tensor-parallel engine can start its worker processes from it."""
    single = LLM("demo", device="cpu", kv_cache_tokens=KV_TOKENS)
    prompt = random_prompts([12], single.config.vocab_size, seed=6)[0]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    want = single.generate([prompt], params, use_tqdm=False)[0]

    async def main():
        engine = AsyncLLM.spawn(LLM, "demo", device="cpu", kv_cache_tokens=KV_TOKENS, tensor_parallel_size=2)
        try:
            return await collect(engine, prompt, params)
        finally:
            await engine.shutdown()

    outs = asyncio.run(main())
    assert sum((o.new_token_ids for o in outs), []) == want.token_ids
    assert "".join(o.new_text for o in outs) == want.text


@pytest.mark.parametrize("spawned", [False, True])
def test_a_late_abort_does_not_touch_a_newer_request_with_the_same_id(local, spawned):
    """A consumer that never read its request's last output closes the iterator after the id was reused: the old
    iterator's abort must not reach the new request."""
    prompt = random_prompts([6], local.config.vocab_size, seed=7)[0]
    short = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    longer = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        engine = AsyncLLM.spawn(LLM, "demo", kv_cache_tokens=KV_TOKENS) if spawned else AsyncLLM(local)
        try:
            old = engine.generate(prompt, short, request_id="x")
            assert not (await anext(old)).finished  # its first tokens; the rest and the end are never read
            await wait_for(engine, lambda s: s.num_running == 0)
            new = engine.generate(prompt, longer, request_id="x")
            first = await anext(new)
            await old.aclose()  # the late close of the old iterator
            outs = [first] + [out async for out in new]
            return outs
        finally:
            await engine.shutdown()

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in outs) == 200


def test_a_failing_engine_thread_fails_its_requests_and_refuses_new_ones(monkeypatch):
    llm = LLM("demo", kv_cache_tokens=KV_TOKENS)
    prompt = random_prompts([6], llm.config.vocab_size, seed=8)[0]

    def broken(*args, **kwargs):
        raise TypeError("a bug outside the step")

    async def main():
        engine = AsyncLLM(llm)
        try:
            monkeypatch.setattr(llm, "make_sequence", broken)
            with pytest.raises(RuntimeError, match="engine loop failed \\(TypeError: a bug outside the step\\)"):
                await anext(engine.generate(prompt, SamplingParams(max_tokens=3)))
            assert engine.dead.startswith("the engine loop failed")
            with pytest.raises(RuntimeError, match="engine loop failed"):
                await anext(engine.generate(prompt, SamplingParams(max_tokens=3)))
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_one_engine_process_serves_several_pipes(local):
    """`start_engine(..., clients=2)` + `AsyncLLM.connect`, as `qwen3 serve --api-server-count 2` runs them: each
    pipe gets its own requests' outputs, equal to LLM.generate's; stats are the whole engine's on both; a pipe that
    detaches (its requests end with "abort") leaves the other serving; the engine exits after the last one."""
    from qwen3.engine.engine_process import start_engine

    prompts = random_prompts([6, 21, 11, 3, 15, 8], local.config.vocab_size, seed=12)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (9, 4, 14, 7, 11, 5)]
    expected = local.generate(prompts, params, use_tqdm=False)
    process, conns = start_engine(LLM, ("demo",), {"kv_cache_tokens": KV_TOKENS}, clients=2)

    async def main():
        a, b = AsyncLLM.connect(conns[0]), AsyncLLM.connect(conns[1])
        try:
            assert a.max_model_len == b.max_model_len == local.max_model_len
            # Interleaved: the even requests through a, the odd ones through b, all in flight together.
            pairs = enumerate(zip(prompts, params, strict=True))
            streams = await asyncio.gather(*(collect(a if i % 2 == 0 else b, p, sp) for i, (p, sp) in pairs))
            await wait_for(a, lambda s: s.num_running == 0 and s.generation_tokens_total == sum(params_tokens))
            await wait_for(b, lambda s: s.generation_tokens_total == sum(params_tokens))  # b sees the same engine
            # a detaches while a request of its own still runs: that one ends with "abort", b keeps serving
            endless = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
            outputs = []

            async def read_endless():
                async for out in a.generate(prompts[0], endless):
                    outputs.append(out)

            reader = asyncio.ensure_future(read_endless())
            await wait_for(a, lambda s: s.num_running == 1)
            await a.shutdown()
            await reader
            assert outputs[-1].finished and outputs[-1].finish_reason == "abort"
            late = await collect(b, prompts[1], params[1])
            return streams, late
        finally:
            await a.shutdown()
            await b.shutdown()

    params_tokens = [sp.max_tokens for sp in params]
    streams, late = asyncio.run(main())
    assert_streams_add_up(streams, expected)
    assert_streams_add_up([late], [expected[1]])
    process.join(30)
    assert process.exitcode == 0  # it exited by itself once both pipes had detached


def test_a_pipe_that_closes_mid_request_frees_its_blocks(local):
    """An HTTP process that dies (its pipe closes without "stop"): its requests are aborted and their blocks freed;
    the other pipe is served on, and the engine exits when that one detaches too."""
    from qwen3.engine.engine_process import start_engine

    process, (gone, kept) = start_engine(LLM, ("demo",), {"kv_cache_tokens": KV_TOKENS}, clients=2)
    assert gone.recv()[0] == "ready"
    endless = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    gone.send(("add", ("doomed", [5, 6, 7], endless)))
    while (message := gone.recv())[0] == "out" and not message[1]:
        pass  # passes with stats only, until the first token
    assert message[1][0][0] == "doomed"
    gone.close()

    async def main():
        engine = AsyncLLM.connect(kept)
        try:
            # (stats reach this pipe too: the doomed request ran, then nothing runs and no block is held)
            await wait_for(engine, lambda s: s.generation_tokens_total > 0 and s.num_running == 0
                           and s.kv_cache_usage == 0)  # fmt: skip
            return await collect(engine, [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        finally:
            await engine.shutdown()

    stream = asyncio.run(main())
    assert stream[-1].finished and sum(len(o.new_token_ids) for o in stream) == 4
    process.join(30)
    assert process.exitcode == 0
