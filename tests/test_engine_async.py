"""AsyncLLM: streamed pieces add up to LLM.generate's outputs, many coroutines share the loop, abort mid-stream
frees the blocks, validation errors surface on the first await, a closed iterator aborts its request, and a consumer
that falls behind gets the increments waiting for it merged into one."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import torch

import qwen3
from conftest import assert_streams_add_up, collect, make_reference
from qwen3.engine import LLM, AsyncLLM, StreamOutput
from qwen3.engine.async_llm import _send, _Stream, auto_stream_interval
from qwen3.sampling import SamplingParams

VOCAB = 320


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine-async")
    make_reference(directory, seed=8)
    return qwen3.load_model(directory)


def random_prompts(lengths, seed=0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def wait_until_idle(llm: LLM) -> None:
    """The loop thread applies aborts between steps; give it a moment, then all blocks must be free."""
    for _ in range(200):
        if not llm.scheduler.has_work():
            break
        asyncio.run(asyncio.sleep(0.01))
    llm.block_manager.check_all_free()


def test_streams_concatenate_to_generate(model, tok):
    llm = LLM(model, tokenizer=tok, kv_cache_tokens=2048, block_size=8)
    prompts = random_prompts([5, 17, 9, 30], seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in (12, 5, 20, 9)]
    params[1] = SamplingParams(temperature=0.8, seed=3, max_tokens=5)
    expected = llm.generate(prompts, params, use_tqdm=False)

    async def main():
        engine = AsyncLLM(llm)
        try:
            streams = await asyncio.gather(*(collect(engine, p, sp) for p, sp in zip(prompts, params, strict=True)))
            return streams, engine.stats()
        finally:
            await engine.shutdown()

    streams, stats = asyncio.run(main())
    assert_streams_add_up(streams, expected)
    assert stats.generation_tokens_total >= 2 * sum(p.max_tokens for p in params)  # generate ran them once too
    llm.block_manager.check_all_free()


def test_stop_string_in_a_stream(model, tok):
    llm = LLM(model, tokenizer=tok, kv_cache_tokens=2048, block_size=8)
    prompt = random_prompts([11], seed=2)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    stop = free.text[5:8]
    params = SamplingParams(temperature=0.0, max_tokens=16, stop=[stop])

    async def main():
        engine = AsyncLLM(llm)
        try:
            return await collect(engine, prompt, params)
        finally:
            await engine.shutdown()

    outs = asyncio.run(main())
    shown = ""
    for o in outs:
        shown += o.new_text
        assert stop not in shown
    assert shown == free.text[: free.text.find(stop)] and outs[-1].finish_reason == "stop"
    llm.block_manager.check_all_free()


def test_abort_mid_stream_and_closing_the_iterator(model):
    llm = LLM(model, kv_cache_tokens=2048, block_size=8)
    prompts = random_prompts([20, 8, 13], seed=4)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        engine = AsyncLLM(llm)
        try:
            # abort by id while streaming: the iterator ends with finish_reason "abort"
            outs = []
            async for out in engine.generate(prompts[0], long, request_id="a"):
                outs.append(out)
                if len(outs) == 3:
                    engine.abort("a")
            assert outs[-1].finished and outs[-1].finish_reason == "abort"
            assert 3 <= outs[-1].num_output_tokens < 200
            streamed = sum((o.new_token_ids for o in outs), [])
            assert len(streamed) == outs[-1].num_output_tokens and min(streamed) >= 0
            # closing the iterator early aborts the request
            stream = engine.generate(prompts[1], long, request_id="b")
            await stream.__anext__()
            await stream.aclose()
            # a cancelled consumer task aborts too
            started = asyncio.Event()

            async def consume():
                async for _ in engine.generate(prompts[2], long, request_id="c"):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # the engine still serves
            short = await collect(engine, prompts[2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
            assert short[-1].finish_reason == "length"
        finally:
            await engine.shutdown()

    asyncio.run(main())
    wait_until_idle(llm)


def test_errors_on_first_await_and_duplicate_ids(model):
    llm = LLM(model, kv_cache_tokens=2048, block_size=8, max_model_len=64)

    async def main():
        engine = AsyncLLM(llm)
        try:
            with pytest.raises(ValueError, match="the prompt has 100 tokens"):
                await collect(engine, [1] * 100, SamplingParams(max_tokens=2))
            with pytest.raises(ValueError, match="token id 999 is outside"):
                await collect(engine, [999], SamplingParams(max_tokens=2))
            slow = engine.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), "same")
            await slow.__anext__()
            with pytest.raises(ValueError, match="already running"):
                await collect(engine, [4, 5], SamplingParams(max_tokens=2), "same")
            await slow.aclose()
            stats = engine.stats()
            assert stats.num_running + stats.num_waiting <= 1 and 0 <= stats.kv_cache_usage <= 1
        finally:
            await engine.shutdown()

    asyncio.run(main())
    wait_until_idle(llm)


def test_a_consumer_that_falls_behind_gets_the_waiting_increments_merged(model, tok):
    llm = LLM(model, tokenizer=tok, kv_cache_tokens=2048, block_size=8)
    prompts = random_prompts([7, 12], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    expected = llm.generate(prompts, params, use_tqdm=False)

    async def main():
        engine = AsyncLLM(llm)
        try:
            fast = asyncio.create_task(collect(engine, prompts[1], params))
            slow = []
            async for out in engine.generate(prompts[0], params):
                slow.append(out)
                if len(slow) == 1:
                    time.sleep(0.5)  # blocks the event loop: the engine runs on, its increments wait
            return slow, await fast
        finally:
            await engine.shutdown()

    slow, fast = asyncio.run(main())
    assert max(len(o.new_token_ids) for o in slow) > 1 and len(slow) < 24  # merged, not one increment per token
    for outs, want in zip((slow, fast), expected, strict=True):
        assert sum((o.new_token_ids for o in outs), []) == want.token_ids
        assert "".join(o.new_text for o in outs) == want.text
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert [o.num_output_tokens for o in outs] == list(itertools.accumulate(len(o.new_token_ids) for o in outs))
        logprobs = [lp for o in outs for lp in o.new_logprobs]
        assert all(len(o.new_logprobs) == len(o.new_token_ids) for o in outs)
        assert [lp.token_id for lp in logprobs] == want.token_ids
        # (the batches differ from generate's, so fp32 sums differ in the last bits)
        assert [lp.logprob for lp in logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
    llm.block_manager.check_all_free()


def test_stream_interval_wakes_at_the_first_token_every_n_tokens_and_the_end(model, tok):
    class Loop:  # records the wake-ups _send schedules
        def __init__(self):
            self.woken = []

        def call_soon_threadsafe(self, callback, streams):
            self.woken.append(len(streams))

    def out(n, finished=False):
        return StreamOutput("r", [7] * n, "x" * n, finished, "stop" if finished else None, [1], 0, 0, None)

    loop = Loop()
    stream = _Stream(None, loop)
    steps = [out(1), out(1), out(1), out(2), out(1), out(1), out(1, finished=True)]
    for item in steps:
        _send([(stream, item)], stream_interval=3)
    # woken at: the first token, when 3 gathered (1+1+2 -> 4), and at the end; every output is pending in order
    assert loop.woken == [1, 1, 1] and list(stream.pending) == steps
    # a stream of phase 2 counts 2 tokens as gathered after its first: it wakes at tokens 1, 2, 5, 8
    loop, woken_at = Loop(), []
    stream = _Stream(None, loop, phase=2)
    for k in range(1, 10):
        _send([(stream, out(1))], stream_interval=3)
        if len(loop.woken) > len(woken_at):
            woken_at.append(k)
    assert woken_at == [1, 2, 5, 8]
    for bad in (0, "2", 1.5):
        with pytest.raises(ValueError, match="stream_interval"):
            AsyncLLM(LLM(model, kv_cache_tokens=256, block_size=8), stream_interval=bad)
    # "auto": every token up to 64 streams, then as many wake-ups per step as 64 streams would make
    assert [auto_stream_interval(n) for n in (0, 1, 64, 65, 128, 129, 256)] == [1, 1, 1, 2, 2, 3, 4]

    # end to end: the pieces still add up to generate's output
    llm = LLM(model, tokenizer=tok, kv_cache_tokens=2048, block_size=8)
    prompt = random_prompts([9], seed=6)[0]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = llm.generate([prompt], params, use_tqdm=False)[0]

    async def main(interval):
        engine = AsyncLLM(llm, stream_interval=interval)
        try:
            return await collect(engine, prompt, params)
        finally:
            await engine.shutdown()

    for interval in ("auto", 4):
        outs = asyncio.run(main(interval))
        assert sum((o.new_token_ids for o in outs), []) == want.token_ids
        assert "".join(o.new_text for o in outs) == want.text
    assert len(outs) < 20 and outs[-1].finished  # (about 1 + 20 / 4: a consumer that is awake takes what is there)
