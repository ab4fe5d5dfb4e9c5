"""Shared fixtures: random-weight reference models from transformers, saved as real HF checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

# The CLI's --compile moves inductor's cache to ~/.cache/qwen3 unless TORCHINDUCTOR_CACHE_DIR is set
# (qwen3/compile_cache.py): tests keep torch's default, under the temporary directory, and leave home alone.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())

ASSETS = Path(__file__).parent / "assets"
QWEN3_06B_FILES = ASSETS / "qwen3-0.6b"  # the real tokenizer + published config (see NOTICE.md there)

SMALL = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,  # nh * D = 96 != hidden 64, as in Qwen3 (2048 != 1024)
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10_000.0,
    tie_word_embeddings=True,
)


def hf_config(**overrides):
    """A transformers Qwen3Config; `rope_scaling` in overrides becomes transformers 5's rope_parameters."""
    from transformers import Qwen3Config as HFConfig

    fields = {**SMALL, **overrides}
    rope = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    rope.update(fields.pop("rope_scaling", None) or {})
    return HFConfig(**fields, rope_parameters=rope)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter, norms included (HF initialises norm scales to exactly 1, which would hide
    a missing or misplaced q_norm/k_norm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.6 / p.shape[-1] ** 0.5)


def make_reference(directory: Path, seed: int = 0, dtype=torch.float32, **overrides):
    """Build transformers' Qwen3ForCausalLM with random weights, save it to `directory`, return it."""
    from transformers import Qwen3ForCausalLM as HFModel

    torch.manual_seed(seed)
    model = HFModel(hf_config(**overrides)).to(dtype).eval()
    randomize(model, seed)
    model.save_pretrained(directory)
    return model


def rewrite_config(directory: Path, edit) -> None:
    path = Path(directory) / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def to_hub_style(data: dict) -> None:
    """Rewrite a transformers-5 config.json in the Hub's (transformers 4) spelling."""
    rope = data.pop("rope_parameters")
    data["rope_theta"] = rope.pop("rope_theta")
    data["rope_scaling"] = None if rope.get("rope_type") == "default" else rope


@pytest.fixture
def small_checkpoint(tmp_path):
    """(reference model, directory) for the small tied GQA config."""
    ref = make_reference(tmp_path / "small")
    return ref, tmp_path / "small"


@pytest.fixture(scope="session")
def tokenizer_files() -> Path:
    return QWEN3_06B_FILES


@pytest.fixture(scope="session")
def hf(tokenizer_files):
    """transformers' tokenizer for the real Qwen3 files: the reference."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_files)


@pytest.fixture(scope="session")
def tok(tokenizer_files):
    """Our tokenizer for the same files."""
    import qwen3

    return qwen3.load_tokenizer(tokenizer_files)


def copy_tokenizer_files(directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(QWEN3_06B_FILES / name, directory / name)


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="session")
def fake_snapshot(tmp_path_factory) -> Path:
    """A directory laid out like a Hub snapshot of Qwen/Qwen3-0.6B: the real tokenizer, chat template and
    generation config, and transformers-saved random weights in a small shape with the real vocabulary."""
    directory = tmp_path_factory.mktemp("Qwen3-0.6B-fake")
    make_reference(directory, seed=1, vocab_size=151936, num_hidden_layers=2, max_position_embeddings=40960,
                   bos_token_id=151643, eos_token_id=151645)  # fmt: skip
    copy_tokenizer_files(directory)
    return directory


def fix_triton_interpreter_scalars() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with int(array of shape (1,)), which NumPy 2
    rejects (a loop bound passed as an argument or read from memory then fails); take the one element explicitly.
    For the tests that run Triton kernels under TRITON_INTERPRET=1; idempotent."""
    import numpy as np
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_qwen3_fixed", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._qwen3_fixed = True
    interpreter._patch_lang_tensor = patched


class TritonTestMode(NamedTuple):
    """Where a test file's Triton kernels run: compiled on CUDA, or on CPU tensors in Triton's interpreter, which only
    a subprocess started with TRITON_INTERPRET=1 has (run_in_triton_interpreter); elsewhere `kernel_test` skips."""

    interpreted: bool
    device: str  # "cuda" when the kernels run compiled, else "cpu"
    run_kernels: bool  # in this process
    kernel_test: pytest.MarkDecorator


def triton_test_mode() -> TritonTestMode:
    """The TritonTestMode of this process (under the interpreter, with fix_triton_interpreter_scalars applied)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cuda" if torch.cuda.is_available() and not interpreted else "cpu"
    run_kernels = device == "cuda" or interpreted
    if interpreted:
        fix_triton_interpreter_scalars()
    kernel_test = pytest.mark.skipif(not run_kernels, reason="runs in the TRITON_INTERPRET=1 subprocess (test below)")
    return TritonTestMode(interpreted, device, run_kernels, kernel_test)


def run_in_triton_interpreter(target: str, select: str | None = None, passed: int | None = None,
                              no_skips: bool = False, timeout: int = 600) -> None:  # fmt: skip
    """Run the pytest `target` (a file, or file::test) in a subprocess with TRITON_INTERPRET=1, which must be set
    before triton is first imported (so a file's kernel tests cannot run in this process), with `-k select`; assert
    that it passed (exactly `passed` tests when given), with nothing failed, errored or (no_skips) skipped."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target]
    if select is not None:
        command += ["-k", select]
    done = subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert (f"{passed} passed" if passed is not None else " passed") in summary, done.stdout[-2000:]
    for word in ("failed", "error") + (("skipped",) if no_skips else ()):
        assert word not in summary, done.stdout[-2000:]


def kv_cache_to_pool(k: torch.Tensor, v: torch.Tensor, length: int, block_size: int, num_blocks: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One sequence's keys and values (layers, nkv, max_length, D), as in qwen3.KVCache, copied at 0..length-1
    into an engine-style pool (2, layers, num_blocks, block_size, nkv, D) through a random block table (int32,
    room for max_length tokens). The pool's other slots hold noise, so a read through a wrong slot shows."""
    L, nkv, max_length, D = k.shape
    width = -(-max_length // block_size)
    table = torch.randperm(num_blocks, generator=generator)[:width].to(torch.int32)
    pool = torch.randn(2, L, num_blocks, block_size, nkv, D, generator=generator).to(k.dtype)
    t = torch.arange(length)
    blocks, offsets = table[t // block_size].long(), t % block_size
    pool[0][:, blocks, offsets] = k[:, :, :length].transpose(1, 2).cpu()
    pool[1][:, blocks, offsets] = v[:, :, :length].transpose(1, 2).cpu()
    return pool.to(k.device), table.to(k.device)


def pool_keys(pool: torch.Tensor, table: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value (layers, nkv, D) stored in the pool at `position` of the sequence with this block table."""
    block_size = pool.shape[3]
    block = table[position // block_size].long()
    return pool[0, :, block, position % block_size], pool[1, :, block, position % block_size]


async def collect(engine, prompt, params, request_id=None) -> list:
    """Every increment an AsyncLLM streams for one request."""
    return [out async for out in engine.generate(prompt, params, request_id)]


def assert_streams_add_up(streams: list[list], expected: list) -> None:
    """Each request's increments (AsyncLLM) concatenate to LLM.generate's output for it: tokens, text, the end."""
    for outs, want in zip(streams, expected, strict=True):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert sum((o.new_token_ids for o in outs), []) == want.token_ids
        assert "".join(o.new_text for o in outs) == want.text
        assert outs[-1].finish_reason == want.finish_reason and outs[-1].num_output_tokens == len(want.token_ids)
        assert all(o.prompt_token_ids == want.prompt_token_ids for o in outs)


class Replayer:
    """A stand-in CUDA graph for the engine's graph path on the CPU: 'replay' re-runs the recorded forward (the
    reference kernels rebuild their gather plan at every forward, where a real graph's Triton kernels read seq_lens
    on the device)."""

    def __init__(self, forward):
        self.forward = forward
        forward()  # the warm-up run, as ModelRunner._record does

    def replay(self):
        self.forward()

    def pool(self):
        return None


def record_stand_in_graphs(monkeypatch) -> None:
    """ModelRunner.capture_graphs then records Replayers instead of CUDA graphs (call it explicitly on the CPU)."""
    from qwen3.engine.runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "_record", staticmethod(lambda forward, memory_pool: Replayer(forward)))
