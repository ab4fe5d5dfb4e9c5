"""Training: data formats, packing and masks, the chunked loss, schedule, parameter groups, exact resume,
checkpoints that qwen3 and transformers load, bits per byte, bad inputs and the CLI.

Training runs use a tiny model (hidden 32, 2 layers) on a tiny byte-level BPE tokenizer built here with
the `tokenizers` library (vocabulary 300, Qwen's special tokens and chat template), so a step takes
milliseconds; data tests that need no model use the real Qwen3 tokenizer from tests/assets.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qwen3
from conftest import QWEN3_06B_FILES, randomize, rel_error
from qwen3.tokenizer import load_tokenizer
from qwen3.train import TrainConfig, TrainError, chunked_cross_entropy, lr_at, train
from qwen3.train.cli import main as cli_main
from qwen3.train.data import (
    IGNORE_INDEX,
    PackedBlocks,
    SampleOrder,
    TokenStream,
    load_dataset,
    split_for_encoding,
    tokenize_files,
    tokenizer_fingerprint,
)
from qwen3.train.loss import CausalLMLoss
from qwen3.train.trainer import build_loss_module, flops_per_token, weight_decay_names

# ---------------------------------------------------------------------------------------------------
# Shared fixtures (imported by test_lora.py and test_train_distributed.py)
# ---------------------------------------------------------------------------------------------------

WORDS = "the cat dog sat on a mat and ran to see big small red blue tree house".split()
TINY_MODEL = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    rope_theta=10_000.0,
    tie_word_embeddings=True,
)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(10)) + "." for _ in range(n)]


def build_tiny_tokenizer(directory: Path) -> Path:
    """A byte-level BPE with 300 ids trained on ASCII sentences, Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences(300, seed=1) + ["user assistant system"] * 5, trainer)
    tok.save(str(directory / "tokenizer.json"))
    template = json.loads((QWEN3_06B_FILES / "tokenizer_config.json").read_text())["chat_template"]
    config = {"chat_template": template, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def write_tiny_config(path: Path, **overrides) -> Path:
    path.write_text(json.dumps({**TINY_MODEL, **overrides, "model_type": "qwen3"}))
    return path


def write_corpus(directory: Path, files: int = 2, lines: int = 60) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (directory / f"part{i}.txt").write_text("\n".join(sentences(lines, seed=10 + i)) + "\n")
    return directory


def save_tiny_model(directory: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny Qwen3 checkpoint with the tokenizer files beside it (a fine-tuning base)."""
    import shutil

    torch.manual_seed(seed)
    model = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config(**{**TINY_MODEL, **overrides}))
    model.init_weights(0.1)
    qwen3.save_model(model, directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def tiny_run(tmp_path: Path, tokenizer_dir: Path, out: str = "out", **overrides) -> TrainConfig:
    """A from-scratch TrainConfig on the tiny corpus; a few milliseconds per step."""
    data = tmp_path / "corpus"
    if not data.exists():
        write_corpus(data)
    fields = dict(
        out=str(tmp_path / out),
        data=[str(data)],
        config=str(write_tiny_config(tmp_path / "tiny_config.json")),
        tokenizer=str(tokenizer_dir),
        cache_dir=str(tmp_path / "cache"),
        block_size=32,
        batch_size=4,
        grad_accum=2,
        max_steps=6,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=1,
        eval_fraction=0.1,
        eval_every=3,
        progress=False,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def train_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["type"] == "train"]


def eval_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in records if r["type"] == "eval"]


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return load_tokenizer(QWEN3_06B_FILES)


def dataset(tmp_path, tokenizer, source, paths, block_size=16, **kwargs):
    return load_dataset(
        [str(p) for p in paths],
        tokenizer,
        tokenizer_fingerprint(source),
        tmp_path / "cache",
        block_size,
        show_progress=False,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def test_text_files_and_folders_are_documents_separated_by_eos(tmp_path, qwen_tokenizer):
    tok = qwen_tokenizer
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    texts = {"b.txt": "Second file, ünïcödé 你好.\n", "sub/a.txt": "Nested file\n\nwith a blank line."}
    for name, text in texts.items():
        (folder / name).write_text(text)
    (folder / "notes.csv").write_text("ignored,file")
    jsonl = tmp_path / "docs.jsonl"
    docs = ["first record", "second <|im_end|> record stays text"]
    jsonl.write_text("\n".join(json.dumps({"text": d, "meta": 1}) for d in docs) + "\n\n")

    data = dataset(tmp_path, tok, QWEN3_06B_FILES, [folder, jsonl], block_size=8)
    eos = tok.token_to_id("<|endoftext|>")
    expected = []
    for text in [texts["b.txt"], texts["sub/a.txt"], *docs]:  # folder files sorted by path, then the jsonl
        expected += tok.encode(text) + [eos]
    ids, learn = data.train.read(0, len(data.train))
    assert ids.tolist() == expected and learn.all()
    assert [f.path.name for f in data.files] == ["b.txt", "a.txt", "docs.jsonl"]
    assert tok.token_to_id("<|im_end|>") not in expected  # text data never turns look-alikes into control tokens

    blocks = PackedBlocks(data.train, 8)
    assert len(blocks) == (len(expected) - 1) // 8 >= 3
    inputs, targets = blocks.batch([2, 0])
    for row, i in enumerate([2, 0]):
        assert inputs[row].tolist() == expected[8 * i : 8 * i + 8]
        assert targets[row].tolist() == expected[8 * i + 1 : 8 * i + 9]


def test_chat_loss_mask_covers_assistant_turns_only(tmp_path, qwen_tokenizer):
    tok = qwen_tokenizer
    chats = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "\n\n4, of course."},
        ],
        [{"role": "user", "content": "Say <|im_start|>assistant please"}, {"role": "assistant", "content": "ok"}],
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    data = dataset(tmp_path, tok, QWEN3_06B_FILES, [path], block_size=8)

    # The reference works on the rendered string: each assistant turn's content through its <|im_end|>.
    expected_spans = []
    for messages in chats:
        rendered = tok.apply_chat_template(messages, add_generation_prompt=False)
        expected_spans += re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", rendered, flags=re.S)
    assert len(expected_spans) == 3
    ids, learn = data.train.read(0, len(data.train))
    edges = np.flatnonzero(np.diff(np.concatenate([[0], learn.astype(np.int8), [0]])))
    spans = [tok.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    # BPE may merge the header's "\n" with newlines that open the content; compare modulo that newline.
    assert [s.removeprefix("\n") for s in spans] == [s.removeprefix("\n") for s in expected_spans]
    # "<|im_start|>assistant" typed by the user is text, not a header: nothing of it is learned.
    assert "please" not in "".join(spans)

    blocks = PackedBlocks(data.train, 8)
    inputs, targets = blocks.batch(range(len(blocks)))
    full_ids, full_learn = data.train.read(0, len(blocks) * 8 + 1)
    expected_targets = np.where(full_learn[1:], full_ids[1:], IGNORE_INDEX)
    assert targets.flatten().tolist() == expected_targets.tolist()
    assert blocks.scored(range(len(blocks))) == int(full_learn[1:].sum())


def test_jsonl_lines_end_at_newline_only(tmp_path, qwen_tokenizer):
    """JSON allows U+2028, U+2029 and U+0085 (where str.splitlines also splits) raw inside a string; a record
    holding them is one line, and a "\\r\\n" line end is tolerated."""
    tok = qwen_tokenizer
    docs = ["line\u2028separator", "para\u2029graph", "next\x85line", "plain"]
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs]
    assert all(len(line.splitlines()) > 1 for line in lines[:3])  # what used to break them
    path = tmp_path / "docs.jsonl"
    path.write_bytes(("\r\n".join(lines[:2]) + "\n" + "\n".join(lines[2:]) + "\r\n").encode("utf-8"))
    data = dataset(tmp_path, tok, QWEN3_06B_FILES, [path], block_size=4)
    eos = tok.token_to_id("<|endoftext|>")
    ids, _ = data.train.read(0, len(data.train))
    assert ids.tolist() == [t for d in docs for t in [*tok.encode(d), eos]]
    assert data.files[0].num_documents == 4


def test_cache_is_reused_and_keyed_by_content(tmp_path, qwen_tokenizer, monkeypatch):
    tok = qwen_tokenizer
    path = tmp_path / "a.txt"
    path.write_text("some text to tokenize " * 20)
    cache = tmp_path / "cache"
    key = tokenizer_fingerprint(QWEN3_06B_FILES)
    [first] = tokenize_files([path], tok, key, cache, show_progress=False)
    assert isinstance(first.tokens, np.memmap) and first.tokens.dtype == np.dtype("<u4")
    assert (cache / f"{first.key}.tokens.u32").stat().st_size == 4 * len(first.tokens)

    monkeypatch.setattr(type(tok), "encode", lambda *a, **k: pytest.fail("re-tokenized a cached file"))
    [again] = tokenize_files([path], tok, key, cache, show_progress=False)
    assert again.key == first.key and np.array_equal(again.tokens, first.tokens)
    monkeypatch.undo()

    path.write_text("different text now")
    [changed] = tokenize_files([path], tok, key, cache, show_progress=False)
    assert changed.key != first.key and changed.tokens.tolist() == tok.encode("different text now") + [151643]
    [other_tok] = tokenize_files([path], tok, "another tokenizer", cache, show_progress=False)
    assert other_tok.key != changed.key


def test_long_text_is_encoded_in_pieces_with_identical_ids(qwen_tokenizer):
    rng = random.Random(0)
    lines = ["".join(rng.choice("ab cd\t,é你") for _ in range(rng.randint(0, 30))) for _ in range(200)]
    text = "".join(line + rng.choice(["\n", "\n\n", " \n", "\r\n", "\n  "]) for line in lines)
    pieces = split_for_encoding(text, piece_chars=50)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert sum((qwen_tokenizer.encode(p) for p in pieces), []) == qwen_tokenizer.encode(text)


def test_eval_fraction_holds_out_the_tail_of_every_file(tmp_path, qwen_tokenizer):
    tok = qwen_tokenizer
    files = []
    for i in range(2):
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_text(" ".join(sentences(30, seed=i)))
    data = dataset(tmp_path, tok, QWEN3_06B_FILES, files, eval_fraction=0.25)
    train_ids, eval_ids, expected_train, expected_eval = [], [], [], []
    for f in data.files:
        n = len(f.tokens)
        cut = n - round(0.25 * n)
        expected_train += f.tokens[:cut].tolist()
        expected_eval += f.tokens[cut:].tolist()
    train_ids = data.train.read(0, len(data.train))[0].tolist()
    eval_ids = data.eval.read(0, len(data.eval))[0].tolist()
    assert train_ids == expected_train and eval_ids == expected_eval
    again = dataset(tmp_path, tok, QWEN3_06B_FILES, files, eval_fraction=0.25)
    assert again.eval.read(0, len(again.eval))[0].tolist() == eval_ids


def test_sample_order_is_a_permutation_per_epoch():
    order = SampleOrder(7, seed=3)
    first, second = [order[g] for g in range(7)], [order[g] for g in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert [SampleOrder(7, seed=3)[g] for g in range(14)] == first + second


def test_token_stream_reads_across_segments():
    a, b = np.arange(5, dtype="<u4"), np.arange(100, 103, dtype="<u4")
    stream = TokenStream([(a, None), (b, np.array([1, 0, 1], dtype=np.uint8))])
    ids, learn = stream.read(3, 7)
    assert ids.tolist() == [3, 4, 100, 101] and learn.tolist() == [True, True, True, False]


# ---------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chunked_cross_entropy_equals_reference_in_float64(chunk_size, reduction):
    gen = torch.Generator().manual_seed(chunk_size)
    N, H, V = 37, 12, 50
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < 0.3] = IGNORE_INDEX

    ours = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, reduction=reduction)
    ours_grads = torch.autograd.grad(ours * 1.7, (hidden, weight))
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    ref_grads = torch.autograd.grad(ref * 1.7, (hidden, weight))
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    assert ours_grads[0][targets == IGNORE_INDEX].abs().max() == 0


def test_chunked_cross_entropy_under_bf16_autocast_matches_the_lm_head_path():
    """Under autocast the logits come from a bf16 matmul, as the LM head's would; loss and grads in fp32."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(29, 16, generator=gen, requires_grad=True)
    weight = (torch.randn(40, 16, generator=gen) * 0.3).requires_grad_()
    targets = torch.randint(0, 40, (29,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_cross_entropy(hidden, weight, targets, chunk_size=8)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, rtol=1e-5)
    ours_grads, ref_grads = torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))
    for a, b in zip(ours_grads, ref_grads, strict=True):
        # Both round the logits' gradient to bf16 before the matmuls; the weight gradient is summed over
        # chunks in fp32 here and inside one bf16 matmul there, so they differ by about bf16's 2^-8.
        assert rel_error(a, b) < 1e-2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_causal_lm_loss_equals_plain_cross_entropy_of_the_model(checkpointing):
    config = qwen3.Qwen3Config(**{**TINY_MODEL, "tie_word_embeddings": False})
    model = qwen3.Qwen3ForCausalLM(config).double()
    randomize(model, seed=5)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (3, 20), generator=gen)
    targets = torch.randint(0, config.vocab_size, (3, 20), generator=gen)
    targets[0, :5] = IGNORE_INDEX

    ours = CausalLMLoss(model, chunk_size=16, activation_checkpointing=checkpointing)(ids, targets)
    ours_grads = torch.autograd.grad(ours, list(model.parameters()))
    logits = model(ids)  # the model's own forward through its LM head: every logit at once
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.allclose(ours, ref, rtol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), ours_grads, ref_grads, strict=True):
        assert rel_error(a, b) < 1e-10, name


def test_activation_checkpointing_recomputes_each_layer_in_backward():
    """Wrapped layers run forward twice per step (once more in backward), keep their parameter names, and
    give the same loss and gradients as unwrapped ones."""
    config = qwen3.Qwen3Config(**TINY_MODEL)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = qwen3.Qwen3ForCausalLM(config)
        model.init_weights(0.1)
        module = build_loss_module(model, chunk_size=8, activation_checkpointing=checkpointing)
        calls: list[int] = []
        for layer in model.model.layers:  # a pre-hook: recomputation stops inside the MLP, at the last saved tensor
            layer.mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        loss = module(ids[:, :-1], ids[:, 1:])
        loss.backward()
        grads = {name: p.grad for name, p in module.named_parameters()}
        results[checkpointing] = (len(calls), loss.detach(), grads)
    assert results[False][0] == TINY_MODEL["num_hidden_layers"] and results[True][0] == 2 * results[False][0]
    assert torch.equal(results[True][1], results[False][1])
    assert results[True][2].keys() == results[False][2].keys()  # same names: optimizer and checkpoints unchanged
    assert all(torch.equal(results[True][2][k], g) for k, g in results[False][2].items())


def test_compiled_checkpointed_layers_keep_only_their_inputs_and_the_same_gradients(monkeypatch):
    """--compile --activation-checkpointing: compiled layers wrapped for checkpointing store what eager wrapped
    layers store (each layer's inputs), a fraction of what compiled layers alone store, and every combination
    gives the plain module's loss and gradients.

    The aot_eager backend traces the layers with Dynamo and builds their forward/backward graphs with
    AOTAutograd, which is what must cope with the checkpoint wrapper; inductor's code generation (minutes on a
    shared CPU) is left to the GPU runs. test_train_distributed.py runs the same under FSDP2."""
    compile_module = torch.nn.Module.compile
    compiled = []

    def compile_aot_eager(self, *args, **kwargs):
        compiled.append(self)
        return compile_module(self, *args, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_aot_eager)
    config = qwen3.Qwen3Config(**TINY_MODEL)
    ids = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    stored, losses, grads = {}, {}, {}
    for compile in (False, True):
        for checkpointing in (False, True):
            torch.manual_seed(0)
            model = qwen3.Qwen3ForCausalLM(config)
            model.init_weights(0.1)
            module = build_loss_module(model, 8, checkpointing, compile)
            sizes: list[int] = []

            def pack(t, sizes=sizes):
                sizes.append(t.numel() * t.element_size())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = module(ids[:, :-1], ids[:, 1:])
            loss.backward()
            key = compile, checkpointing
            stored[key], losses[key] = sum(sizes), loss.detach()
            grads[key] = {name: p.grad for name, p in module.named_parameters()}
    assert len(compiled) == 2 * TINY_MODEL["num_hidden_layers"]
    assert stored[True, True] == stored[False, True] < stored[True, False] / 4
    assert stored[False, True] < stored[False, False] / 4
    for key in [(False, True), (True, False), (True, True)]:
        assert torch.allclose(losses[key], losses[False, False], rtol=1e-6, atol=0), key
        assert grads[key].keys() == grads[False, False].keys()
        for name, g in grads[False, False].items():
            assert rel_error(grads[key][name], g) < 1e-6, (key, name)


# ---------------------------------------------------------------------------------------------------
# Schedule, parameter groups, FLOPs
# ---------------------------------------------------------------------------------------------------


def test_lr_schedule_is_linear_warmup_then_cosine_to_min_lr():
    lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 110
    for step, expected in [
        (0, 1e-4),  # (0 + 1) / 10 of the peak
        (4, 5e-4),
        (9, 1e-3),  # warmup ends at the peak
        (10, 1e-3),  # cosine starts at the peak
        (10 + 99 / 2, 1e-4 + 0.5 * (1e-3 - 1e-4)),  # half way down the cosine
        (109, 1e-4),  # last step: min_lr
    ]:
        assert lr_at(step, lr, min_lr, warmup, total) == pytest.approx(expected, rel=1e-12)
    step = 37
    hand = min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup - 1))) / 2
    assert lr_at(step, lr, min_lr, warmup, total) == pytest.approx(hand, rel=1e-12)
    assert lr_at(0, lr, min_lr, 0, total) == lr  # no warmup


@pytest.mark.parametrize("tied", [True, False])
def test_weight_decay_skips_norms_and_embeddings(tied):
    model = qwen3.Qwen3ForCausalLM(qwen3.Qwen3Config(**{**TINY_MODEL, "tie_word_embeddings": tied}))
    decay, no_decay = weight_decay_names(CausalLMLoss(model))
    assert set(no_decay) == {
        f"model.{n}" for n, p in model.named_parameters() if n.endswith("norm.weight") or "embed_tokens" in n
    }
    projections = {f"model.{n}" for n, _ in model.named_parameters() if n.endswith("proj.weight")}
    assert set(decay) == projections | (set() if tied else {"model.lm_head.weight"})
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_flops_per_token_counts_non_embedding_params_lm_head_and_attention():
    for tied in (True, False):
        config = qwen3.Qwen3Config(**{**TINY_MODEL, "tie_word_embeddings": tied})
        model = qwen3.Qwen3ForCausalLM(config)
        lm_head = config.vocab_size * config.hidden_size
        non_embedding = model.num_parameters(include_embedding=False) + (lm_head if tied else 0)
        attention = 12 * config.num_hidden_layers * 32 * config.num_attention_heads * config.head_dim
        assert flops_per_token(config, 32) == 6 * non_embedding + attention


# ---------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------


def test_resume_repeats_the_uninterrupted_run_bit_for_bit(tmp_path, tiny_tokenizer):
    straight = train(tiny_run(tmp_path, tiny_tokenizer, out="straight"))
    assert straight.step == 6 and len(straight.losses) == 6
    first = train(tiny_run(tmp_path, tiny_tokenizer, out="split", stop_after=3))
    assert first.step == 3 and first.checkpoint.name == "checkpoint-3"
    second = train(tiny_run(tmp_path, tiny_tokenizer, out="split", resume="auto"))
    assert second.start_step == 3 and second.step == 6
    assert first.losses + second.losses == straight.losses  # exact float equality
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")
    assert eval_losses(tmp_path / "split") == eval_losses(tmp_path / "straight")
    a = qwen3.load_model(straight.checkpoint).state_dict()
    b = qwen3.load_model(second.checkpoint).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses[-1] < straight.losses[0]


def test_checkpoint_loads_in_qwen3_and_transformers_with_equal_logits(tmp_path, tiny_tokenizer):
    from transformers import Qwen3ForCausalLM as HFModel

    result = train(tiny_run(tmp_path, tiny_tokenizer, max_steps=2, eval_every=0, peak_tflops=1.0))
    ckpt = result.checkpoint
    assert (tmp_path / "out" / "last").read_text().strip() == ckpt.name
    ours = qwen3.load_model(ckpt)
    hf = HFModel.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_error(ours(ids), hf(ids).logits) < 1e-5
    assert load_tokenizer(ckpt).encode("the cat") == load_tokenizer(tiny_tokenizer).encode("the cat")

    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["grad_norm"] > 0 for r in train_records)
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, 2]
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((ckpt / "training_state.json").read_text())
    assert state["step"] == 2 and state["samples_seen"] == 2 * 4 * 2
    assert not list((tmp_path / "out").glob(".checkpoint-*"))  # no temporary folder left behind


def test_keep_checkpoints_prunes_only_step_checkpoints(tmp_path, tiny_tokenizer):
    """--keep-checkpoints removes the oldest checkpoint-<step> folders and leaves any other name alone."""
    run = dict(max_steps=5, eval_every=0, save_every=1, keep_checkpoints=2)
    train(tiny_run(tmp_path, tiny_tokenizer, stop_after=2, **run))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    import shutil

    shutil.copytree(out / "checkpoint-2", out / "checkpoint-best")  # a user keeps the best one by hand
    for name in ("checkpoint-1.bak", "checkpoint-007", "checkpoint-"):
        (out / name).mkdir()
    result = train(tiny_run(tmp_path, tiny_tokenizer, resume="auto", **run))
    assert result.step == 5
    kept = ["checkpoint-", "checkpoint-007", "checkpoint-1.bak", "checkpoint-4", "checkpoint-5", "checkpoint-best"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == kept
    assert (out / "checkpoint-best" / "model.safetensors").is_file()


def file_modes(*folders: Path) -> dict[str, int]:
    """Permission bits of every regular file below `folders`, by path relative to its folder."""
    return {
        f"{d.name}/{p.relative_to(d)}": p.stat().st_mode & 0o777 for d in folders for p in d.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_get_the_umask_mode(tmp_path, tiny_tokenizer, umask):
    """Every file a run writes (cache, weights, optimizer, RNG, state, pointer, metrics, plot) is created like
    open() would create it, 0o666 & ~umask, never mkstemp's private 0o600."""
    previous = os.umask(umask)
    try:
        train(tiny_run(tmp_path, tiny_tokenizer, max_steps=2, eval_every=0))
    finally:
        os.umask(previous)
    modes = file_modes(tmp_path / "out", tmp_path / "cache")
    for name in ("training_state.json", "rng_state_rank0.safetensors", "model.safetensors", "optimizer.pt"):
        assert f"out/checkpoint-2/{name}" in modes
    assert {"out/last", "out/metrics.jsonl", "out/loss.png"} <= set(modes)
    assert sum(name.startswith("cache/") for name in modes) == 4  # 2 files: tokens and description each
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_bits_per_byte_on_a_hand_example(tmp_path, tiny_tokenizer):
    """A model with a zero LM head predicts uniformly: every scored token costs ln V nats.

    Held-out text "aé€" + EOS is 7 tokens with the tiny tokenizer: a, é as 2 byte tokens, € as 3, EOS.
    One block of 6 scores the last 6 (the first token has no context): é (2 bytes), € (3 bytes) and EOS
    (a separator: no bytes). So bpb = 6 ln V / ln 2 / 5 bytes."""
    tok = load_tokenizer(tiny_tokenizer)
    assert len(tok.encode("aé€")) == 6
    base = save_tiny_model(tmp_path / "base", tiny_tokenizer, tie_word_embeddings=False)
    model = qwen3.load_model(base)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    qwen3.save_model(model, base)
    (tmp_path / "heldout.txt").write_text("aé€")
    config = tiny_run(
        tmp_path,
        tiny_tokenizer,
        config=None,
        model=str(base),
        tokenizer=None,
        eval_fraction=0.0,
        eval_data=[str(tmp_path / "heldout.txt")],
        block_size=6,
        max_steps=1,
        warmup_steps=0,
        lr=0.0,
        min_lr=0.0,
    )
    metrics = train(config).eval_metrics
    V = TINY_MODEL["vocab_size"]
    assert metrics["eval_tokens"] == 6
    assert metrics["eval_loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert metrics["eval_bpb"] == pytest.approx(6 * math.log2(V) / 5, rel=1e-6)
    assert metrics["eval_ppl"] == pytest.approx(V, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear TrainError, nothing overwritten
# ---------------------------------------------------------------------------------------------------


def _bad_data(tmp_path: Path, case: str) -> tuple[list[str], dict, str]:
    """(data paths, extra TrainConfig fields, expected message pattern) for a bad-input case."""
    d = tmp_path / "bad"
    d.mkdir()
    if case == "empty file":
        (d / "empty.txt").write_text("  \n")
        return [str(d / "empty.txt")], {}, r"empty\.txt: empty file"
    if case == "not utf-8":
        (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
        return [str(d / "latin1.txt")], {}, r"latin1\.txt: not valid UTF-8 text \(byte 3\)"
    if case == "no files in folder":
        (d / "table.csv").write_text("a,b")
        return [str(d)], {}, r"--data: no data files \(\*\.txt, \*\.jsonl\) found in .*bad"
    if case == "missing path":
        return [str(d / "nope.txt")], {}, r"--data: .*nope\.txt: no such file or directory"
    if case == "wrong suffix":
        (d / "data.csv").write_text("a,b")
        return [str(d / "data.csv")], {}, r"data\.csv is neither a \.txt nor a \.jsonl file"
    if case == "too short":
        (d / "short.txt").write_text("the cat")
        return [str(d / "short.txt")], {}, r"short\.txt give \d+ training tokens; one block needs block_size \+ 1 = 33"
    if case == "chat without assistant":
        line = json.dumps({"messages": [{"role": "user", "content": "anyone there?"}]})
        (d / "chat.jsonl").write_text(line + "\n" + line + "\n")
        return [str(d / "chat.jsonl")], {}, r"chat\.jsonl: no assistant turns to train on"
    if case == "malformed jsonl":
        (d / "docs.jsonl").write_text('{"text": "fine"}\n\n{"text": "broken\n')
        message = r"docs\.jsonl:3: not valid JSON \(Unterminated string starting at column 10\)$"  # once "at at"
        return [str(d / "docs.jsonl")], {}, message
    if case == "text then chat jsonl":
        chat = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        (d / "mixed.jsonl").write_text('\n{"text": "fine"}\n' + chat + "\n")
        return [str(d / "mixed.jsonl")], {}, r"mixed\.jsonl:3: a 'messages' record, but line 2 is a 'text' record"
    if case == "chat then text jsonl":
        chat = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        (d / "mixed.jsonl").write_text(chat + '\n{"text": "fine"}\n')
        return [str(d / "mixed.jsonl")], {}, r"mixed\.jsonl:2: a 'text' record, but line 1 is a 'messages' record"
    if case == "jsonl without fields":
        (d / "docs.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
        return [str(d / "docs.jsonl")], {}, r"docs\.jsonl:2: expected a string 'text' field"
    if case == "chat messages not a list":
        (d / "chat.jsonl").write_text('{"messages": "hello"}\n')
        return [str(d / "chat.jsonl")], {}, r"chat\.jsonl:1: 'messages' must be a list of objects"
    if case == "eval set too short":
        (d / "tiny.txt").write_text("cat")
        corpus = write_corpus(tmp_path / "corpus")
        return [str(corpus)], {"eval_data": [str(d / "tiny.txt")], "eval_fraction": 0.0}, r"--eval-data: the held-out"
    raise AssertionError(case)


BAD_DATA_CASES = [
    "empty file",
    "not utf-8",
    "no files in folder",
    "missing path",
    "wrong suffix",
    "too short",
    "chat without assistant",
    "malformed jsonl",
    "text then chat jsonl",
    "chat then text jsonl",
    "jsonl without fields",
    "chat messages not a list",
    "eval set too short",
]


@pytest.mark.parametrize("case", BAD_DATA_CASES)
def test_bad_data_is_a_clear_error(tmp_path, tiny_tokenizer, case):
    paths, extra, pattern = _bad_data(tmp_path, case)
    with pytest.raises(TrainError, match=pattern) as info:
        train(tiny_run(tmp_path, tiny_tokenizer, data=paths, **extra))
    assert "\n" not in str(info.value)
    out = tmp_path / "out"
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"cache"}  # no run artefacts


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"preset": "0.6B"}, r"exactly one of --preset, --config, --model"),
        ({"batch_size": 0}, r"--batch-size: must be a positive integer"),
        ({"min_lr": 1.0}, r"need 0 <= min_lr <= lr"),
        ({"warmup_steps": 6}, r"--warmup-steps: must be in \[0, max_steps\)"),
        ({"eval_data": ["x"]}, r"--eval-fraction and --eval-data"),
        ({"parallel": "ddp"}, r"--parallel ddp: needs several processes"),
        ({"lora_rank": 4}, r"--lora-rank: LoRA adapts a pretrained model"),
        ({"block_size": 512}, r"--block-size: 512 exceeds max_position_embeddings \(256\)"),
        ({"tokenizer": None}, r"--tokenizer: required when training from scratch"),
        ({"config": "/nonexistent/config.json"}, r"--config: .*no such file"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path, tiny_tokenizer, fields, pattern):
    with pytest.raises(TrainError, match=pattern):
        train(tiny_run(tmp_path, tiny_tokenizer, **fields))


@pytest.mark.parametrize(
    ("device", "pattern"),
    [
        ("cuda", r"--device: 'cuda': no CUDA GPU available"),
        ("cuda:1", r"--device: 'cuda:1': no CUDA GPU available"),
        ("mps", r"--device: 'mps': MPS \(Apple GPU\) is not available"),
        ("gpu", r"--device: 'gpu': not a device name"),
        ("meta", r"--device: 'meta' holds no data"),
    ],
    ids=["cuda", "cuda:1", "mps", "gpu", "meta"],
)
def test_a_device_this_machine_lacks_is_a_clear_error(tmp_path, tiny_tokenizer, monkeypatch, capsys, device, pattern):
    """Checked with the flags, before anything is loaded; the CLI says it in one line with status 2."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(TrainError, match=pattern):
        train(tiny_run(tmp_path, tiny_tokenizer, device=device))
    config = write_tiny_config(tmp_path / "config.json")
    args = ["train", "--config", str(config), "--tokenizer", str(tiny_tokenizer), "--data", str(tmp_path)]
    assert cli_main([*args, "--out", str(tmp_path / "run"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert re.match("qwen3: error: " + pattern, err) and err.count("\n") == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_existing_run_is_never_overwritten_and_resume_checks_the_config(tmp_path, tiny_tokenizer):
    train(tiny_run(tmp_path, tiny_tokenizer, max_steps=2, eval_every=0))
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    with pytest.raises(TrainError, match=r"--out: .* already holds a run .*--resume .*--overwrite"):
        train(tiny_run(tmp_path, tiny_tokenizer, max_steps=2, eval_every=0))
    with pytest.raises(
        TrainError,
        match=r"--resume: .*checkpoint-2 was written by a run with another configuration "
        r"\(block_size: 32 in the checkpoint, 16 now\)",
    ):
        train(tiny_run(tmp_path, tiny_tokenizer, max_steps=2, eval_every=0, block_size=16, resume="auto"))
    other = write_corpus(tmp_path / "other", files=1, lines=50)
    with pytest.raises(TrainError, match=r"another configuration \(data: "):
        train(tiny_run(tmp_path, tiny_tokenizer, max_steps=2, eval_every=0, resume="auto", data=[str(other)]))
    with pytest.raises(TrainError, match=r"--resume: .* is not a training checkpoint"):
        train(tiny_run(tmp_path, tiny_tokenizer, max_steps=2, resume=str(tmp_path)))
    with pytest.raises(TrainError, match=r"--resume: no checkpoint to resume in .*elsewhere"):
        train(tiny_run(tmp_path, tiny_tokenizer, out="elsewhere", resume="auto"))
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before

    result = train(tiny_run(tmp_path, tiny_tokenizer, max_steps=3, eval_every=0, overwrite=True))
    assert result.step == 3 and not (out / "checkpoint-2").exists()


DAMAGED_CHECKPOINTS = {
    # file of checkpoint-1 -> (new contents, expected message after "--resume: <path>")
    "not json": ("training_state.json", b'{"step": 1,', r" is damaged, not readable JSON \(Expecting"),
    "empty state": ("training_state.json", b"", r" is damaged, not readable JSON"),
    "state not an object": ("training_state.json", b"[1]", r" is damaged: expected a JSON object, found list"),
    "state without step": ("training_state.json", b'{"format": 1, "signature": {}}', r" is damaged: needs an integer"),
    "state of another format": ("training_state.json", b'{"format": 9}', r" has format 9; this version reads 1"),
    "rng not safetensors": ("rng_state_rank0.safetensors", b"\x00" * 40, r" is damaged, not a random generator state"),
    "rng without cpu": ("rng_state_rank0.safetensors", "other tensor", r" is damaged, .*\(no 'cpu' tensor\)"),
    "rng of the wrong size": ("rng_state_rank0.safetensors", "short cpu", r" is damaged, not a random generator"),
    "empty optimizer": ("optimizer.pt", b"", r" is damaged, not an optimizer state \(EOFError\)"),
}
DAMAGE_RUN = dict(max_steps=3, eval_every=0)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, tiny_tokenizer) -> Path:
    """A folder holding a tiny run stopped after step 1 (corpus, config and cache beside it)."""
    folder = tmp_path_factory.mktemp("interrupted")
    train(tiny_run(folder, tiny_tokenizer, stop_after=1, **DAMAGE_RUN))
    return folder


@pytest.mark.parametrize("case", DAMAGED_CHECKPOINTS)
def test_resume_from_a_damaged_checkpoint_names_the_file(tmp_path, tiny_tokenizer, interrupted_run, case):
    import shutil

    from safetensors.torch import save_file

    name, contents, pattern = DAMAGED_CHECKPOINTS[case]
    shutil.copytree(interrupted_run, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "out" / "checkpoint-1" / name
    if contents == "other tensor":
        save_file({"gpu": torch.zeros(4, dtype=torch.uint8)}, path)
    elif contents == "short cpu":
        save_file({"cpu": torch.zeros(4, dtype=torch.uint8)}, path)
    else:
        path.write_bytes(contents)
    with pytest.raises(TrainError, match=re.escape(f"--resume: {path}") + pattern) as info:
        train(tiny_run(tmp_path, tiny_tokenizer, resume="auto", **DAMAGE_RUN))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def test_cli_train_runs_and_reports_errors(tmp_path, tiny_tokenizer, capsys):
    data = write_corpus(tmp_path / "corpus")
    config = write_tiny_config(tmp_path / "config.json")
    args = [
        "train",
        "--config",
        str(config),
        "--tokenizer",
        str(tiny_tokenizer),
        "--data",
        str(data),
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    assert cli_main(args) == 0
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").is_file()
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen3: error: --out: ") and err.count("\n") == 1
    state = tmp_path / "run" / "checkpoint-2" / "training_state.json"
    state.write_text("")  # a disk that filled up
    assert cli_main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    expected = f"--resume: {state} is damaged, not readable JSON (Expecting value: line 1 column 1 (char 0))"
    assert err == f"qwen3: error: {expected}\n"
    with pytest.raises(SystemExit) as info:
        cli_main(["train", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--preset", "--data", "--eval-fraction", "--grad-accum", "--parallel", "--lora-rank", "--resume"):
        assert flag in help_text
