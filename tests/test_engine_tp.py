"""The engine under tensor parallelism (qwen3.engine.tensor_parallel) on the CPU: 2 ranks over gloo, fp32, small
random models from conftest.make_reference. The single-process engine on the same checkpoint is the reference
(itself tested against qwen3.generate in test_engine.py)."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

import qwen3
from conftest import make_reference, record_stand_in_graphs
from qwen3.engine import LLM, AsyncLLM
from qwen3.engine.tensor_parallel import TensorParallel, pack_step, run_packed
from qwen3.sampling import SamplingParams

VOCAB = 320


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Rank 0 (this process) and the worker share 2 cores: one intra-op thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine-tp")
    make_reference(directory, seed=11)  # 4 query heads, 2 KV heads, MLP 96, vocabulary 320: all divide by 2
    return directory


def random_prompts(lengths, seed=0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def settings(**kwargs) -> dict:
    return dict(kv_cache_tokens=2048, block_size=8, max_num_batched_tokens=24, **kwargs)


def tp_processes(llm: LLM) -> list[multiprocessing.Process]:
    return list(llm.tp.processes)


def test_tp2_outputs_equal_the_single_process_engine(checkpoint):
    prompts = random_prompts([1, 5, 8, 17, 30, 45], seed=1)  # around block boundaries; 30 and 45 take chunks
    max_tokens = [9, 4, 12, 7, 10, 6]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    params[2] = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True)  # rank 0 samples
    single = LLM(checkpoint, **settings())
    expected = [o.token_ids for o in single.generate(prompts, params, use_tqdm=False)]
    llm = LLM(checkpoint, tensor_parallel_size=2, **settings())
    try:
        assert llm.model.num_kv_heads == 1 and llm.pool.kv.shape[-2] == 1  # rank 0 holds its KV head only
        assert llm.config.num_blocks == single.config.num_blocks
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.token_ids for o in outputs] == expected
        assert [len(o.token_ids) for o in outputs] == max_tokens
        llm.block_manager.check_all_free()
        # Again, in reverse order: the prefix cache now hits (each prompt's full blocks), the outputs stay the same.
        outputs = llm.generate(prompts[::-1], params[::-1], use_tqdm=False)
        assert [o.token_ids for o in outputs] == expected[::-1]
        assert outputs[0].num_cached_tokens == 40  # 45 tokens: 5 full blocks of 8
        llm.block_manager.check_all_free()
        # Streaming (the server's path): the step loop runs in AsyncLLM's thread, rank 0's collectives with it.

        async def stream_all() -> list[list[int]]:
            engine = AsyncLLM(llm)
            try:
                async def one(prompt, p) -> list[int]:
                    return [t async for out in engine.generate(prompt, p) for t in out.new_token_ids]

                return await asyncio.gather(*(one(q, p) for q, p in zip(prompts, params, strict=True)))
            finally:
                await engine.shutdown()

        assert asyncio.run(stream_all()) == expected
        llm.block_manager.check_all_free()
        processes = tp_processes(llm)
        assert all(p.is_alive() for p in processes)
    finally:
        llm.shutdown()
    assert all(p.exitcode == 0 for p in processes)  # stopped by rank 0, left cleanly
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("qwen3-tp")]
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(prompts[:1], params[:1], use_tqdm=False)


def test_tp2_preemption_equals_the_single_process_engine(checkpoint):
    """A pool too small for all requests: sequences are preempted and recomputed, on every rank alike."""
    prompts = random_prompts([20, 27, 13, 31], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    small = dict(kv_cache_tokens=96, block_size=8, max_num_batched_tokens=32)
    single = LLM(checkpoint, **small)
    expected = [o.token_ids for o in single.generate(prompts, params, use_tqdm=False)]
    assert single.scheduler.num_preemptions > 0
    llm = LLM(checkpoint, tensor_parallel_size=2, **small)
    try:
        assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
        assert llm.scheduler.num_preemptions == single.scheduler.num_preemptions
        llm.block_manager.check_all_free()
    except BaseException:
        llm.shutdown()
        raise
    # Dropped without shutdown: collecting the engine stops its worker, and a new one can start.
    processes = tp_processes(llm)
    del llm
    gc.collect()
    assert all(p.exitcode is not None for p in processes)
    llm = LLM(checkpoint, tensor_parallel_size=2, **small)
    llm.shutdown()


def test_uneven_sizes_and_built_models_fail_before_any_process_starts(checkpoint):
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="num_attention_heads: 4 is not divisible by the tensor-parallel size 3"):
        LLM(checkpoint, tensor_parallel_size=3, **settings())
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 needs a checkpoint source"):
        LLM(qwen3.load_model(checkpoint), tensor_parallel_size=2, **settings())
    with pytest.raises(ValueError, match="tensor_parallel_size=0 must be a positive integer"):
        LLM(checkpoint, tensor_parallel_size=0, **settings())
    assert set(multiprocessing.active_children()) == before


def test_uneven_kv_heads_fail(tmp_path):
    make_reference(tmp_path, seed=2, num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(ValueError, match="num_key_value_heads: 1 is not divisible by the tensor-parallel size 2"):
        LLM(tmp_path, tensor_parallel_size=2, **settings())


def test_a_killed_worker_stops_generate_with_an_error_naming_it(checkpoint):
    llm = LLM(checkpoint, tensor_parallel_size=2, **settings())
    (worker,) = tp_processes(llm)
    killed_at = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(worker.pid, signal.SIGKILL)

    prompts = random_prompts([20] * 4, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)  # far longer than the test runs
    timer = threading.Timer(1.0, kill)
    timer.start()
    try:
        with pytest.raises(RuntimeError, match=rf"worker rank 1 \(pid {worker.pid}\) was killed by signal 9"):
            llm.generate(prompts, params, use_tqdm=False)
        assert killed_at and time.monotonic() - killed_at[0] < 10
        llm.block_manager.check_all_free()  # the interrupted requests gave their blocks back
        with pytest.raises(RuntimeError, match="the engine has stopped"):  # and it stays stopped
            llm.generate(prompts[:1], params, use_tqdm=False)
    finally:
        timer.cancel()
        llm.shutdown()
    assert worker.exitcode == -signal.SIGKILL
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("qwen3-tp")]




class LocalTP:
    """Rank 0's packing and every rank's unpacking, in one process, with no collective in between."""

    header = staticmethod(TensorParallel.header)

    def __init__(self):
        self.graph_steps = 0

    def step(self, runner, header, data, holes, in_flight):
        self.graph_steps += bool(header[5]) and any(b >= header[2] for b in runner.graphs)
        return run_packed(runner, header, pack_step(runner, data, holes, in_flight))


def test_packed_steps_and_the_graph_path_in_one_process(checkpoint, monkeypatch):
    """What every rank runs from the broadcast tensor (pack_step, run_packed), graph path included (a stand-in
    graph on the CPU: same static buffers, buckets and padding rows as on CUDA), equals the plain runner."""
    prompts = random_prompts([3, 9, 17, 30, 5, 12, 1, 25, 8, 2, 19], seed=22)
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=3 + 2 * (i % 5)) for i in range(11)]
    expected = [o.token_ids for o in LLM(checkpoint, **settings()).generate(prompts, params, use_tqdm=False)]
    record_stand_in_graphs(monkeypatch)
    llm = LLM(checkpoint, max_num_seqs=16, **settings())
    llm.runner.capture_graphs()
    assert list(llm.runner.graphs) == [1, 2, 4, 8, 16]
    llm.runner.tp = local = LocalTP()
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    assert local.graph_steps > 5  # 11 sequences decode in the 16 bucket, then fewer
    llm.block_manager.check_all_free()


# ---------------------------------------------------------------------------------------------------
# Two GPUs (NCCL, the CUDA graphs with the all-reduces inside), each scenario in a subprocess under a time limit:
# a hang (a capture or an abort that does not work) fails the test instead of stopping the suite.

CUDA_SCENARIO = r"""
import os, signal, sys, threading, time
import torch
from qwen3.engine import LLM
from qwen3.sampling import SamplingParams

if __name__ == "__main__":
    directory, mode = sys.argv[1], sys.argv[2]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (1, 5, 17, 30, 45, 12, 3)]
    kw = dict(device="cuda", dtype=torch.float32, kv_cache_tokens=1 << 20, block_size=16, max_num_seqs=32,
              max_num_batched_tokens=64)
    if mode == "equal":
        params = [SamplingParams(temperature=0.0, max_tokens=6 + 5 * i, ignore_eos=True) for i in range(7)]
        expected = [o.token_ids for o in LLM(directory, **kw).generate(prompts, params, use_tqdm=False)]
        for eager in (False, True):
            llm = LLM(directory, tensor_parallel_size=2, enforce_eager=eager, **kw)
            assert eager or llm.runner.graphs, "no CUDA graphs captured"
            got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            assert got == expected, (eager, got, expected)
            llm.block_manager.check_all_free()
            llm.shutdown()
            assert llm.tp.processes[0].exitcode == 0
    else:
        llm = LLM(directory, tensor_parallel_size=2, **kw)
        worker = llm.tp.processes[0]
        killed = []
        threading.Timer(3.0, lambda: killed.append(time.monotonic()) or os.kill(worker.pid, signal.SIGKILL)).start()
        params = SamplingParams(temperature=0.0, max_tokens=30000, ignore_eos=True)  # minutes of decoding
        try:
            llm.generate(prompts, params, use_tqdm=False)
            raise AssertionError("generate ended without an error")
        except RuntimeError as e:
            assert f"worker rank 1 (pid {worker.pid})" in str(e), e
            assert time.monotonic() - killed[0] < 15, time.monotonic() - killed[0]
        llm.shutdown()
    print("SCENARIO OK", flush=True)
"""

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine-tp-cuda")
    make_reference(directory, seed=11, max_position_embeddings=32768)
    return directory


def run_scenario(directory, mode: str) -> None:
    import subprocess
    import sys

    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    done = subprocess.run([sys.executable, "-c", CUDA_SCENARIO, str(directory), mode], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert "SCENARIO OK" in done.stdout, done.stdout[-3000:] + done.stderr[-5000:]


@two_gpus
def test_cuda_tp2_graphs_and_eager_equal_one_gpu(long_checkpoint):
    run_scenario(long_checkpoint, "equal")


@two_gpus
def test_cuda_killed_worker_stops_generate(long_checkpoint):
    run_scenario(long_checkpoint, "kill")


def test_serve_tp_flag_reaches_the_engine_not_torchrun():
    """`qwen3 serve --tp 2` sets the engine's tensor_parallel_size; args.tp (which makes qwen3.cli restart a
    command under torchrun) stays unset."""
    pytest.importorskip("starlette")
    from qwen3.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "demo", "--tp", "2"])
    assert args.tensor_parallel_size == 2 and getattr(args, "tp", 1) == 1
    assert build_parser().parse_args(["serve"]).tensor_parallel_size == 1
