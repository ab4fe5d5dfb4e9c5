"""qwen3.engine.stream: one request stepped on the caller's thread. Its pieces add up to LLM.generate's outputs,
closing it early frees the blocks, bad input fails before anything runs, and `complete` keeps generate_text's
limits (the CLI and chat tests compare the two paths end to end)."""

from __future__ import annotations

import pytest
import torch

import qwen3
from conftest import make_reference
from qwen3.engine import LLM
from qwen3.engine.stream import complete, single_llm, stream
from qwen3.generate import ContextLengthError, generate_text
from qwen3.sampling import SamplingParams

VOCAB = 320


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine-stream")
    make_reference(directory, seed=9)
    return qwen3.load_model(directory)


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_stream_pieces_add_up_to_generate(model, tok):
    llm = LLM(model, tokenizer=tok, max_num_seqs=1, kv_cache_tokens=256, block_size=8)
    cases = [(random_prompt(5, 1), SamplingParams(temperature=0.0, max_tokens=12)),
             (random_prompt(19, 2), SamplingParams(temperature=0.9, top_k=40, seed=4, max_tokens=9)),
             (random_prompt(19, 2), SamplingParams(temperature=0.0, max_tokens=1))]  # fmt: skip
    for prompt, params in cases:
        expected = llm.generate([prompt], params, use_tqdm=False)[0]
        outs = list(stream(llm, prompt, params))
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert sum((o.new_token_ids for o in outs), []) == expected.token_ids
        assert "".join(o.new_text for o in outs) == expected.text
        assert outs[-1].finish_reason == expected.finish_reason == "length"
        assert outs[-1].num_output_tokens == params.max_tokens
    assert outs[-1].num_cached_tokens == 16  # the same 19-token prompt again: two full blocks of 8 from the cache
    llm.block_manager.check_all_free()


def test_closing_a_stream_early_frees_its_blocks(model, tok):
    llm = LLM(model, tokenizer=tok, max_num_seqs=1, kv_cache_tokens=256, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=50)
    steps = stream(llm, random_prompt(30, 3), params)
    first = [next(steps), next(steps)]
    assert not first[-1].finished and llm.block_manager.num_free_blocks < llm.block_manager.num_blocks
    steps.close()
    llm.block_manager.check_all_free()
    assert not llm.scheduler.has_work()
    # The engine carries on: the next request gives the plain path's tokens.
    prompt = random_prompt(11, 4)
    want = qwen3.generate(model, [prompt], 7)[0].tolist()
    assert sum((o.new_token_ids for o in stream(llm, prompt, SamplingParams(temperature=0.0, max_tokens=7))),
               []) == want  # fmt: skip


def test_bad_input_fails_before_anything_runs(model, tok):
    llm = LLM(model, tokenizer=tok, max_num_seqs=1, kv_cache_tokens=64, block_size=8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stream(llm, [1, 2, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="the prompt is empty"):
        stream(llm, [], SamplingParams())
    assert not llm.has_work()
    with pytest.raises(ContextLengthError, match=r"= 65 exceeds the engine's max_model_len of 64 tokens"):
        complete(llm, random_prompt(60, 5), 5)
    empty = complete(llm, random_prompt(60, 5), 0)
    plain = generate_text(model, tok, random_prompt(60, 5), 0)
    assert (empty.text, empty.token_ids, empty.finish_reason, empty.prompt_tokens) == (
        plain.text, plain.token_ids, plain.finish_reason, plain.prompt_tokens)  # fmt: skip


def test_single_llm_holds_one_conversation(model, tok):
    llm = single_llm(model, tok, 10**6)  # more than the model's context: capped at it
    assert llm.max_model_len == model.config.max_position_embeddings
    assert llm.config.max_num_seqs == 1
    assert llm.block_manager.num_blocks * llm.config.block_size == llm.max_model_len
