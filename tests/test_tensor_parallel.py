"""Tensor-parallel inference (qwen3.parallel) on two CPU processes (torchrun, gloo) against one process.

One torchrun run of this file (the `__main__` part at the bottom) loads every test checkpoint on both ranks
and saves what each rank computed; the tests compare that with the single-process model (the plain path),
with transformers (the independent reference) and with the checkpoint files.

Tolerance. TP changes only where sums are split: o_proj and down_proj each sum over nh*D (or I) products in
one matmul on one process, and over two halves plus an all-reduce on two. fp32 addition is not associative,
so the logits differ by rounding alone: measured 4e-7 to 1e-6 of max |logit| on these configs; asserted 1e-5.
A wrong slice, a head paired with the wrong KV head or a missing all-reduce gives errors of order 1.
Both ranks must agree bit for bit: the all-reduce hands each the same sum and the all-gather the same logits.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import qwen3
import qwen3.checkpoint
import qwen3.parallel
from conftest import copy_tokenizer_files, make_reference, rel_error
from qwen3.checkpoint import fused_parts, unfuse_state
from qwen3.cli import main
from qwen3.config import Qwen3Config
from qwen3.model import KVCache
from qwen3.parallel import shard_config
from qwen3.quantize import quantize_int8, set_int8_kernel

TP = 2
TP_TOLERANCE = 1e-5  # max |TP - single| / max |single|, fp32 (see the module docstring)
HF_TOLERANCE = 1e-4  # against transformers, as tests/test_parity.py
NEW_TOKENS = 10

# Small configs where heads, KV heads, MLP features and vocabulary divide by 2 (conftest.SMALL underneath).
CONFIGS = {
    "tied-gqa": {},  # 4 query heads, 2 KV heads: one KV head per rank
    "untied-gqa4-yarn": dict(
        hidden_size=96, num_attention_heads=8, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        tie_word_embeddings=False, num_hidden_layers=2,
        rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
    ),  # groups of 4 query heads per KV head: a rank's 4 query heads must read its one KV head
    "untied-mha-sharded": dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16, intermediate_size=80,
        tie_word_embeddings=False, num_hidden_layers=2, vocab_size=500,
    ),  # saved in several safetensors files with an index
}  # fmt: skip
INDIVISIBLE = dict(num_attention_heads=4, num_key_value_heads=1)  # multi-query: 1 KV head cannot split in 2
# int8 checkpoints (quantize_int8 of a CONFIGS model, saved): {name: (float config, include_embedding)}.
# Both run the plain int8 kernel, in one process and on the ranks: auto would take the bf16 int8pack kernel
# where in_features allows it, which a rank's narrower row-parallel layer may not.
INT8_CONFIGS = {
    "int8-tied-embedding": ("tied-gqa", True),  # int8 embedding shared with the vocab-parallel head
    "int8-untied-by-quantize": ("tied-gqa", False),  # float embedding, the head's own int8 copy (saved untied)
    "int8-untied-mha": ("untied-mha-sharded", True),  # int8 embedding (replicated) and int8 head apart
}
INT8_SPLIT_TYPES = {"Int8RowParallelLinear", "Int8VocabParallelLinear"}


# ---------------------------------------------------------------------------------------------------
# The two-process run, once for the module
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, {config: transformers reference}) after one torchrun of this file over every checkpoint."""
    workdir = tmp_path_factory.mktemp("tensor_parallel")
    references = {}
    for i, (name, overrides) in enumerate(CONFIGS.items()):
        ref = make_reference(workdir / "single-file" / name, seed=30 + i, **overrides)
        if name.endswith("-sharded"):
            ref.save_pretrained(workdir / name, max_shard_size="40KB")
            assert (workdir / name / "model.safetensors.index.json").is_file()
        else:
            (workdir / "single-file" / name).rename(workdir / name)
        references[name] = ref
    for name, (base, include_embedding) in INT8_CONFIGS.items():
        quantized = quantize_int8(qwen3.load_model(workdir / base), include_embedding=include_embedding)
        qwen3.save_model(quantized, workdir / name, max_shard_bytes=40_000)  # sharded
        tied = CONFIGS[base].get("tie_word_embeddings", True) and include_embedding  # quantize unties otherwise
        assert Qwen3Config.from_json(workdir / name / "config.json").tie_word_embeddings is tied
    make_reference(workdir / "indivisible", **INDIVISIBLE)
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "ids": torch.randint(0, 320, (2, 33), generator=gen),  # 320: the smallest vocabulary above
        "ids_one_row": torch.randint(0, 320, (1, 17), generator=gen),
        "prompts": [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (5, 12, 1)],
    }
    torch.save(inputs, workdir / "inputs.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(TP),
               __file__, str(workdir), *CONFIGS, *INT8_CONFIGS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return workdir, references


def results(workdir: Path, name: str) -> list[dict]:
    return [torch.load(workdir / f"{name}-rank{rank}.pt") for rank in range(TP)]


def single_process_model(workdir: Path, name: str) -> qwen3.Qwen3ForCausalLM:
    """The plain path: the whole checkpoint in this one process (the int8 ones with the plain kernel)."""
    model = qwen3.load_model(workdir / name)
    set_int8_kernel(model, "plain")
    return model


# ---------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*CONFIGS, *INT8_CONFIGS])
@torch.no_grad()
def test_logits_equal_the_single_process_model(run, name):
    workdir, references = run
    single = single_process_model(workdir, name)
    inputs = torch.load(workdir / "inputs.pt")
    ranks = results(workdir, name)
    for key in ("ids", "ids_one_row"):  # one row: the all-gather of a (1, T, V/2) block
        expected = single(inputs[key])
        assert ranks[0][key].shape == expected.shape
        assert torch.equal(ranks[0][key], ranks[1][key])
        assert rel_error(ranks[0][key], expected) <= TP_TOLERANCE
        if name in references:  # an int8 model's reference is the single-process int8 model, above
            assert rel_error(ranks[0][key], references[name](inputs[key]).logits) <= HF_TOLERANCE


def test_int8_checkpoints_load_as_split_int8_layers(run):
    """Every rank holds the single-process int8 model's modules, the split ones as their int8 parallel kind,
    and its logits differ from the float model's by int8 rounding: the test above compares int8 models."""
    workdir, _ = run
    for name, (base, _) in INT8_CONFIGS.items():
        whole = {key: type(m).__name__ for key, m in single_process_model(workdir, name).named_modules()}
        for rank, float_rank in zip(results(workdir, name), results(workdir, base), strict=True):
            local = rank["module_types"]
            assert local.keys() == whole.keys()
            for key, kind in whole.items():
                assert local[key] == kind or (kind == "Int8Linear" and local[key] in INT8_SPLIT_TYPES), key
            assert local["lm_head"] == "Int8VocabParallelLinear"
            layers = Qwen3Config.from_json(workdir / name / "config.json").num_hidden_layers
            assert list(local.values()).count("Int8RowParallelLinear") == 2 * layers  # o_proj, down_proj
            assert rel_error(rank["ids"], float_rank["ids"]) > 10 * TP_TOLERANCE  # int8 rounding, well above TP's


@pytest.mark.parametrize("name", [*CONFIGS, *INT8_CONFIGS])
def test_greedy_generation_equals_the_single_process_model(run, name):
    workdir, _ = run
    prompts = torch.load(workdir / "inputs.pt")["prompts"]  # three lengths in one batch: padding and positions
    expected = qwen3.generate(single_process_model(workdir, name), prompts, max_new_tokens=NEW_TOKENS)
    ranks = results(workdir, name)
    assert torch.equal(ranks[0]["greedy"], expected)
    assert torch.equal(ranks[1]["greedy"], expected)
    assert torch.equal(ranks[0]["greedy_one_row"], expected[1:2])  # generate_text's case: batch 1


@pytest.mark.parametrize("name", [*CONFIGS, *INT8_CONFIGS])
def test_seeded_sampling_draws_the_same_tokens_on_every_rank(run, name):
    workdir, _ = run
    ranks = results(workdir, name)
    assert ranks[0]["sampled"].shape == (3, NEW_TOKENS)
    assert torch.equal(ranks[0]["sampled"], ranks[1]["sampled"])


def test_torch_compile_traces_the_collectives_in_one_graph(run):
    """fullgraph=True: no graph break at an all-reduce or the all-gather, so the fast decode step
    (generate.DecodeStep: torch.compile, a CUDA graph on GPU) can take a TP model; same logits as eager."""
    workdir, _ = run
    for rank in results(workdir, "tied-gqa"):
        assert rel_error(rank["compiled"], rank["ids"]) <= 1e-6


@pytest.mark.parametrize("name", [*CONFIGS, *INT8_CONFIGS])
def test_each_rank_holds_and_reads_only_its_slices(run, name):
    workdir, _ = run
    directory = workdir / name
    full = {}
    for file in directory.glob("*.safetensors"):
        full.update(load_file(file))
    config = Qwen3Config.from_json(directory / "config.json")
    tied = {}  # a tied LM head is the embedding's tensors (its int8 scales too): not stored
    if config.tie_word_embeddings:
        tied = {n.replace("model.embed_tokens.", "lm_head."): t for n, t in full.items() if "embed_tokens" in n}
        full.update(tied)
    nh, nkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    features = config.intermediate_size
    # The size of the dimension each split matrix divides in two: heads x D, MLP features, the vocabulary.
    split_sizes = {"q_proj": nh * D, "k_proj": nkv * D, "v_proj": nkv * D, "o_proj": nh * D, "gate_proj": features,
                   "up_proj": features, "down_proj": features, "lm_head": config.vocab_size}  # fmt: skip
    for rank, result in enumerate(results(workdir, name)):
        state = result["state"]
        assert state.keys() == full.keys()
        sharded_bytes = full_bytes = 0
        for key, tensor in state.items():
            module = key.removesuffix(".weight").removesuffix(".weight_scale")
            style = qwen3.parallel.split_style(key)
            whole = full[key]
            assert tensor.dtype == whole.dtype, key  # int8 stays int8, float32 stays float32
            # replicated: embedding, norms; and a row-parallel int8 layer's scales (one per output row: all)
            if style is None or (style == "rowwise" and key.endswith(".weight_scale")):
                assert torch.equal(tensor, whole), key
                continue
            # rank r: query heads [r nh/2, (r+1) nh/2), KV heads [r nkv/2, ...), features, tokens alike
            rows = split_sizes[module.rsplit(".")[-1]]
            block = slice(rank * rows // TP, (rank + 1) * rows // TP)
            expected = whole[block] if style in ("colwise", "vocab") else whole[:, block]
            assert torch.equal(tensor, expected), key
            sharded_bytes += tensor.numel() * tensor.element_size()
            full_bytes += whole.numel() * whole.element_size()
        assert sharded_bytes * TP == full_bytes

        reads = result["reads"]  # (name, shape read from the file) for every read, recorded in the worker
        stored = [n for n in full if n not in tied]
        assert sorted(n for n, _ in reads) == sorted(stored)  # each tensor read once
        for key, shape in reads:
            assert shape == tuple(state[key].shape), (key, shape)  # this rank's slice, never the whole matrix
        assert result["cache_heads"] == (nh // TP, nkv // TP)
        assert result["kv_cache_shape"] == (config.num_hidden_layers, 3, nkv // TP, 20, D)


def test_indivisible_heads_are_a_clear_error(run):
    workdir, _ = run
    for rank in range(TP):
        message = json.loads((workdir / f"indivisible-rank{rank}.json").read_text())["error"]
        assert message.startswith("num_key_value_heads: 1 is not divisible by the tensor-parallel size 2")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_attention_heads=6, num_key_value_heads=3), "num_attention_heads: 6"),  # 6 / 4
        (dict(num_attention_heads=4, num_key_value_heads=2), "num_key_value_heads: 2"),
        (dict(intermediate_size=98), "intermediate_size: 98"),
        (dict(vocab_size=322), "vocab_size: 322"),
    ],
)
def test_shard_config_names_the_field_that_does_not_divide(overrides, field):
    config = Qwen3Config(**{**dict(vocab_size=320, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4),
                            **overrides})  # fmt: skip
    with pytest.raises(ValueError, match=f"^{field} is not divisible by the tensor-parallel size 4"):
        shard_config(config, 4)
    local = shard_config(Qwen3Config(num_attention_heads=32, num_key_value_heads=8, intermediate_size=12288), 4)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size) == (8, 2, 3072)
    assert local.vocab_size == 151936  # whole: every rank ends with all the logits


# ---------------------------------------------------------------------------------------------------
# The command line: `--tp 2` restarts itself under torchrun; rank 0 alone reads stdin and prints
# ---------------------------------------------------------------------------------------------------

STATS = re.compile(r"\[\d+ tokens, [\d.]+ tok/s\]")


def qwen3_cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "qwen3.cli", *argv]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)


def test_cli_generate_with_tp_prints_the_single_process_text_once(fake_snapshot, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The capital of France is"))
    argv = ["generate", "--model", str(fake_snapshot), "--temperature", "0", "--max-new-tokens", "8"]
    assert main(argv) == 0
    expected = capsys.readouterr().out
    done = qwen3_cli(*argv, "--tp", "2", stdin="The capital of France is")  # the prompt on stdin: rank 0 reads it
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == expected


def test_cli_chat_with_tp_follows_the_single_process_conversation(fake_snapshot, capsys, monkeypatch):
    script = "Hello\n/no_think\nAnd now?\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    argv = ["chat", "--model", str(fake_snapshot), "--temperature", "0", "--max-new-tokens", "6"]
    assert main(argv) == 0
    expected = capsys.readouterr().out
    done = qwen3_cli(*argv, "--tp", "2", stdin=script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert STATS.sub("[stats]", done.stdout) == STATS.sub("[stats]", expected)
    assert done.stdout.count("qwen3 chat:") == 1 and len(STATS.findall(done.stdout)) == 2


def test_cli_tp_that_does_not_divide_is_one_line_before_starting_processes(tmp_path):
    make_reference(tmp_path, **INDIVISIBLE)
    copy_tokenizer_files(tmp_path)
    done = qwen3_cli("generate", "--model", str(tmp_path), "--tp", "2", "hello")
    assert done.returncode == 2
    assert done.stderr == (
        "qwen3: error: num_key_value_heads: 1 is not divisible by the tensor-parallel size 2 "
        "(each rank owns whole KV heads)\n"
    )


# ---------------------------------------------------------------------------------------------------
# Leaving: a worker that still references its process group must exit cleanly, with its output flushed
# ---------------------------------------------------------------------------------------------------

EXIT_SCRIPT = """
import torch, torch.distributed as dist
from qwen3.parallel import exit_worker, init_distributed
init_distributed("cpu")
group = dist.group.WORLD  # referenced past destroy_process_group, as torch's own lazy imports do
for _ in range(50):
    dist.all_reduce(torch.randn(64, 384))
    dist.all_gather([torch.empty(4096), torch.empty(4096)], torch.randn(4096))
dist.broadcast_object_list([None], src=0)
print(f"rank {dist.get_rank()} done", end="")  # still in stdout's buffer: exit_worker must flush it
exit_worker(3)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exit_worker_ends_every_rank_with_its_code_and_its_output():
    # Without exit_worker (destroy_process_group, then the interpreter's teardown) about 1 run in 3 of this
    # script aborted a rank with "terminate called without an active exception"; 8 runs catch that ~96% of
    # the time.
    for _ in range(8):
        port = free_port()
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", EXIT_SCRIPT],
                env={
                    **os.environ,
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1",
                },  # fmt: skip
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(2)
        ]
        outputs = [p.communicate(timeout=60) for p in processes]
        assert [p.returncode for p in processes] == [3, 3], [err[-2000:] for _, err in outputs]
        assert [out for out, _ in outputs] == ["rank 0 done", "rank 1 done"]


# ---------------------------------------------------------------------------------------------------
# The worker: what each rank computes (python -m torch.distributed.run ... this file WORKDIR CONFIG...)
# ---------------------------------------------------------------------------------------------------


class RecordingSafeOpen:
    """safe_open that records (tensor name, shape read) for every tensor read: whole or sliced."""

    reads: list[tuple[str, tuple[int, ...]]] = []

    def __init__(self, *args, **kwargs) -> None:
        from safetensors import safe_open

        self.handle = safe_open(*args, **kwargs)

    def __enter__(self):
        self.file = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_tensor(self, name):
        tensor = self.file.get_tensor(name)
        self.reads.append((name, tuple(tensor.shape)))
        return tensor

    def get_slice(self, name):
        reads, sliced = self.reads, self.file.get_slice(name)

        class Slice:
            def get_shape(self):
                return sliced.get_shape()

            def get_dtype(self):
                return sliced.get_dtype()

            def __getitem__(self, index):
                tensor = sliced[index]
                reads.append((name, tuple(tensor.shape)))
                return tensor

        return Slice()


def worker(workdir: Path, names: list[str]) -> None:
    world = qwen3.parallel.init_distributed("cpu")
    inputs = torch.load(workdir / "inputs.pt")
    qwen3.checkpoint.safe_open = RecordingSafeOpen  # record what this rank reads from the files
    for name in names:
        RecordingSafeOpen.reads = []
        model = qwen3.parallel.load_model_tp(workdir / name)
        set_int8_kernel(model, "plain")  # as single_process_model
        # under the files' names: the rank's q, k, v (gate, up) rows, cut out of its fused qkv (gate_up) matrix
        state = unfuse_state(model.state_dict(), fused_parts(model))
        out = {"reads": RecordingSafeOpen.reads, "state": {k: v.clone() for k, v in state.items()}}
        out["module_types"] = {k: type(m).__name__ for k, m in model.named_modules()}
        with torch.no_grad():
            out["ids"], out["ids_one_row"] = model(inputs["ids"]), model(inputs["ids_one_row"])
        out["greedy"] = qwen3.generate(model, inputs["prompts"], max_new_tokens=NEW_TOKENS)
        out["greedy_one_row"] = qwen3.generate(model, inputs["prompts"][1:2], max_new_tokens=NEW_TOKENS)
        out["sampled"] = qwen3.generate(model, inputs["prompts"], NEW_TOKENS, temperature=1.0, seed=7)
        if name == "tied-gqa":  # aot_eager: dynamo + functionalisation of the collectives, no code generation
            compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
            with torch.no_grad():
                out["compiled"] = compiled(inputs["ids"])
        attention = model.model.layers[0].self_attn
        q_rows = attention.split_sizes(attention.qkv_proj.out_features)[0]
        out["cache_heads"] = (q_rows // model.config.head_dim, model.num_kv_heads)
        out["kv_cache_shape"] = tuple(KVCache.for_model(model, 3, 20).k.shape)
        torch.save(out, workdir / f"{name}-rank{world.rank}.pt")
    try:
        qwen3.parallel.load_model_tp(workdir / "indivisible")
        error = None
    except ValueError as e:
        error = str(e)
    (workdir / f"indivisible-rank{world.rank}.json").write_text(json.dumps({"error": error}))
    dist.barrier()
    qwen3.parallel.exit_worker(0)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
