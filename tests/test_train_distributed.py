"""Two CPU processes (torchrun, gloo) train like one process with the same global batch, under DDP and FSDP2.

Both runs see the same blocks in the same order at every step (each process reads its half of every global
micro-batch), so they compute the same mathematical function; they differ only in floating-point
reduction order: one process sums the loss and gradient contributions of all 4 rows of a micro-batch
inside its matmuls, two processes each sum 2 rows and then all-reduce (DDP) or reduce-scatter (FSDP) the
halves. fp32 addition is not associative, so the trajectories differ by a few ulps per step, amplified
a little by Adam's division by sqrt(v). Measured: at most ~1e-7 relative on the losses over 6 steps; the
bound asserted is 1e-5. The checkpoints (gathered to rank 0 under FSDP) must match to 1e-4 absolute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen3
from qwen3.train import train
from test_train import build_tiny_tokenizer, eval_losses, tiny_run, train_losses

RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run, and the config the two-process runs repeat."""
    tmp = tmp_path_factory.mktemp("distributed")
    tokenizer = build_tiny_tokenizer(tmp / "tokenizer")
    config = tiny_run(tmp, tokenizer, out="single", max_steps=6, eval_every=3)
    result = train(config)
    return tmp, tokenizer, config, result


# A torchrun entry point that compiles with AOTAutograd's eager backend: Dynamo traces each decoder layer and
# AOTAutograd builds its forward/backward graphs (what --compile must survive with activation checkpointing and
# FSDP), without inductor's C++ code generation, which takes minutes on a shared CPU.
AOT_EAGER_CLI = """
import sys
from torch import nn
compile_module = nn.Module.compile
nn.Module.compile = lambda self, *args, **kwargs: compile_module(self, *args, backend="aot_eager", **kwargs)
from qwen3.train.cli import main
sys.exit(main())
"""


def torchrun(config, out: Path, parallel: str, flags: tuple[str, ...] = ()) -> None:
    args = [
        "train",
        "--config",
        config.config,
        "--tokenizer",
        config.tokenizer,
        "--data",
        *config.data,
        "--cache-dir",
        config.cache_dir,
        "--block-size",
        str(config.block_size),
        "--batch-size",
        str(config.batch_size),
        "--grad-accum",
        str(config.grad_accum),
        "--max-steps",
        str(config.max_steps),
        "--lr",
        str(config.lr),
        "--min-lr",
        str(config.min_lr),
        "--warmup-steps",
        str(config.warmup_steps),
        "--eval-fraction",
        str(config.eval_fraction),
        "--eval-every",
        str(config.eval_every),
        "--no-progress",
        "--parallel",
        parallel,
        "--out",
        str(out),
        *flags,
    ]
    entry = ["-m", "qwen3.train.cli"]
    if "--compile" in flags:
        script = out.parent / "aot_eager_cli.py"
        script.write_text(AOT_EAGER_CLI)
        entry = [str(script)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *entry,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(
    ("parallel", "flags"),
    [("ddp", ()), ("fsdp", ()), ("fsdp", ("--activation-checkpointing", "--compile"))],
    ids=["ddp", "fsdp", "fsdp-checkpointing-compile"],
)
def test_two_processes_follow_the_single_process_trajectory(reference, parallel, flags):
    """Activation checkpointing recomputes the same layers and compiling traces them: neither changes the math."""
    tmp, _, config, single = reference
    out = tmp / "-".join((parallel, *flags))
    torchrun(config, out, parallel, flags)

    ours, ref = train_losses(out), train_losses(tmp / "single")
    assert [s for s, _ in ours] == [s for s, _ in ref] == list(range(1, 7))
    assert [loss for _, loss in ours] == pytest.approx([loss for _, loss in ref], rel=RTOL, abs=0)
    ours_eval, ref_eval = eval_losses(out), eval_losses(tmp / "single")
    assert [s for s, _ in ours_eval] == [s for s, _ in ref_eval] == [0, 3, 6]
    assert [loss for _, loss in ours_eval] == pytest.approx([loss for _, loss in ref_eval], rel=RTOL, abs=0)
    assert ref[-1][1] < ref[0][1]  # it did learn something

    gathered = qwen3.load_model(out / "checkpoint-6").state_dict()
    expected = qwen3.load_model(single.checkpoint).state_dict()
    assert gathered.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(gathered[name], expected[name], rtol=0, atol=1e-4), name
