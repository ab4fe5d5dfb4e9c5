"""Generation: batched rows equal batch-of-one, context limit, EOS, stop strings and UTF-8-safe streaming."""

from __future__ import annotations

import pytest
import torch

import qwen3
from conftest import make_reference
from qwen3.config import Qwen3Config
from qwen3.generate import ContextLengthError, generate_text
from qwen3.model import Qwen3ForCausalLM
from qwen3.sampling import SamplingParams


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small")
    make_reference(directory, seed=21, vocab_size=400, max_position_embeddings=64)
    return qwen3.load_model(directory)


class Scripted(Qwen3ForCausalLM):
    """A model whose greedy continuation is a fixed script, whatever the prompt: for driving the text layer
    with chosen tokens (split UTF-8 characters, stop strings, EOS)."""

    def __init__(self, script: list[int], vocab_size: int = 151936) -> None:
        super().__init__(Qwen3Config(vocab_size=vocab_size, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                     num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                                     max_position_embeddings=4096))  # fmt: skip
        self.script = script
        self.prompt_length = None
        self.forwards = 0

    def forward(self, input_ids, positions=None, cache=None, logits_index=None):
        self.forwards += 1
        B, T = input_ids.shape
        if logits_index is not None:  # prefill: the logits after the last prompt token predict script[0]
            self.prompt_length = int(logits_index.max()) + 1
            steps = [0]
        else:  # the token at position p predicts script[p + 1 - prompt_length]
            steps = (positions[0] + 1 - self.prompt_length).tolist()
        logits = torch.zeros(B, len(steps), self.config.vocab_size)
        for t, step in enumerate(steps):
            logits[:, t, self.script[min(step, len(self.script) - 1)]] = 1.0
        return logits[:, 0] if logits_index is not None else logits


def test_batched_greedy_rows_equal_batch_of_one(small):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in (3, 17, 9, 12)]
    batched = qwen3.generate(small, prompts, max_new_tokens=15)
    assert batched.shape == (4, 15)
    for row, prompt in zip(batched, prompts, strict=True):
        assert row.tolist() == qwen3.generate(small, torch.tensor([prompt]), max_new_tokens=15)[0].tolist()


def test_batched_sampling_rows_stop_at_eos_and_pad(small):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    greedy = qwen3.generate(small, prompts, max_new_tokens=12)
    eos = int(greedy[0, 4])  # whatever row 0 emits fifth becomes the "EOS" id
    out = qwen3.generate(small, prompts, max_new_tokens=12, eos_token_ids=[eos], pad_token_id=399)
    first = greedy[0].tolist().index(eos)
    assert out[0, : first + 1].tolist() == greedy[0, : first + 1].tolist()
    assert (out[0, first + 1 :] == 399).all()


def test_seeded_sampling_reproducible(small):
    params = SamplingParams(temperature=1.0, top_k=50, seed=123)
    a = qwen3.generate(small, [[5, 6, 7]], max_new_tokens=20, sampling=params)
    b = qwen3.generate(small, [[5, 6, 7]], max_new_tokens=20, sampling=params)
    c = qwen3.generate(small, [[5, 6, 7]], max_new_tokens=20, sampling=SamplingParams(temperature=1.0, seed=124))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_prompt_that_does_not_fit_is_refused(small):
    with pytest.raises(ContextLengthError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(10\) = 70 exceeds .* 64"):
        qwen3.generate(small, [[1] * 60], max_new_tokens=10)


def test_penalties_change_generation(small):
    plain = qwen3.generate(small, [[1, 2, 3]], max_new_tokens=30)
    penalised = qwen3.generate(small, [[1, 2, 3]], max_new_tokens=30,
                               sampling=SamplingParams(temperature=0.0, repetition_penalty=5.0))  # fmt: skip
    assert len(set(penalised[0].tolist())) >= len(set(plain[0].tolist()))


def split_characters(tok):
    """Characters whose UTF-8 bytes the tokenizer spreads over several tokens."""
    chars = [c for c in "鿰𠀀𠀁㐀🦜👍🏽龘" if len(tok.encode(c)) > 1]
    assert chars
    return chars


def test_stream_never_splits_a_character(tok):
    text = "".join(f"{c} x{c}" for c in split_characters(tok)) + " done"
    ids = tok.encode(text)
    chunks = []
    completion = generate_text(Scripted(ids + [tok.im_end_id]), tok, "hi", 200, on_text=chunks.append)
    assert completion.text == text == "".join(chunks)
    assert completion.finish_reason == "eos" and completion.token_ids == ids
    assert all("\ufffd" not in c for c in chunks)


def test_stop_strings_cut_and_never_stream_their_prefix(tok):
    text = "Answer: 42. END of story, more text"
    chunks = []
    completion = generate_text(Scripted(tok.encode(text)), tok, "q", 100, stop=["END", "never"], on_text=chunks.append)
    assert completion.text == "Answer: 42. " == "".join(chunks)
    assert completion.finish_reason == "stop"


def test_max_new_tokens_and_both_eos_ids(tok):
    ids = tok.encode("one two three four five six")
    c = generate_text(Scripted(ids), tok, "q", 3)
    assert c.finish_reason == "length" and c.token_ids == ids[:3]
    for eos in (tok.im_end_id, tok.endoftext_id):
        c = generate_text(Scripted(ids[:2] + [eos] + ids), tok, "q", 50)
        assert c.finish_reason == "eos" and c.text == tok.decode(ids[:2])


def test_stream_equals_decode_of_random_model_output(tok, tmp_path):
    make_reference(tmp_path, seed=3, vocab_size=151936, num_hidden_layers=1)
    model = qwen3.load_model(tmp_path)
    chunks = []
    c = generate_text(model, tok, "Hello", 40, SamplingParams(temperature=1.0, seed=5), on_text=chunks.append)
    assert "".join(chunks) == c.text == tok.decode(c.token_ids)
    assert c.prompt_tokens == len(tok.encode("Hello")) and c.completion_tokens == len(c.token_ids)


def test_prompt_lookup_draft():
    from qwen3.generate import prompt_lookup_draft

    assert prompt_lookup_draft([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]  # trigram miss, bigram "2 3" hit
    assert prompt_lookup_draft([7, 8, 9, 7, 8], 5) == [9, 7, 8]
    assert prompt_lookup_draft([1, 2, 3], 4) == []


def test_speculative_greedy_equals_plain_greedy(small):
    gen = torch.Generator().manual_seed(9)
    for n in (5, 12):
        chunk = torch.randint(0, 400, (n,), generator=gen).tolist()
        prompt = [chunk * 3]  # repetitive, so drafts get accepted
        plain = qwen3.generate(small, prompt, max_new_tokens=20)
        fast = qwen3.generate(small, prompt, max_new_tokens=20, speculative=4)
        assert fast.tolist() == plain.tolist()
    with pytest.raises(ValueError, match="speculative"):
        qwen3.generate(small, [[1, 2], [3, 4]], max_new_tokens=4, speculative=2)


def test_speculative_accepts_right_drafts():
    """A model that keeps repeating its prompt: every draft is right, so 8 tokens come per forward."""
    script = list(range(10, 40))
    plain = Scripted(script * 3, vocab_size=400)
    expected = qwen3.generate(plain, [script * 2], max_new_tokens=24)
    fast = Scripted(script * 3, vocab_size=400)
    assert qwen3.generate(fast, [script * 2], max_new_tokens=24, speculative=8).tolist() == expected.tolist()
    assert expected[0].tolist() == script[:24]
    assert plain.forwards == 24 and fast.forwards == 1 + 3  # prefill, then 3 verifications of 1 + 8 tokens


def test_compiled_decode_equals_plain(small):
    gen = torch.Generator().manual_seed(10)
    prompts = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in (4, 11)]
    plain = qwen3.generate(small, prompts, max_new_tokens=12)
    fast = qwen3.generate(small, prompts, max_new_tokens=12, compile=True)
    assert fast.tolist() == plain.tolist()
