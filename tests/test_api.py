"""The Python API as a user meets it: the README's snippet runs as pasted, and bad input to `generate` or the
forward is a ValueError that says what is wrong, not an IndexError from inside torch."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

import qwen3
from qwen3.config import Qwen3Config

README = Path(__file__).parent.parent / "README.md"


def readme_api_snippet() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section holds one snippet"
    return blocks[0]


def test_the_readme_api_snippet_runs_as_pasted(tmp_path, monkeypatch):
    code = readme_api_snippet()
    assert code.count('"Qwen/Qwen3-0.6B"') == 1  # the one model id, swapped for the shipped demo model below
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace('"Qwen/Qwen3-0.6B"', '"demo"'), str(README), "exec"), namespace)
    model, tok = namespace["model"], namespace["tok"]
    # What it printed is what it computed: the greedy continuation, then the streamed completion.
    completion = namespace["completion"]
    assert printed.getvalue() == (
        tok.decode(namespace["new_ids"][0].tolist()) + "\n" + completion.text
        + f"\n[{completion.finish_reason}: {completion.completion_tokens} tokens]\n"
    )  # fmt: skip
    assert completion.finish_reason in ("eos", "stop", "length") and "\n\n" not in completion.text
    # The cached decode step equals the full forward at that position.
    ids = torch.cat([namespace["input_ids"], namespace["next_id"]], dim=1)
    torch.testing.assert_close(namespace["logits"][:, -1], model(ids)[:, -1], rtol=1e-4, atol=1e-4)
    saved = qwen3.load_model(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values(), strict=True))


@pytest.fixture(scope="module")
def small_model() -> qwen3.Qwen3ForCausalLM:
    config = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, head_dim=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(0)
    return qwen3.Qwen3ForCausalLM(config).eval()


@pytest.mark.parametrize("bad", [96, 1000, -1])
def test_token_ids_outside_the_vocabulary_are_a_clear_error(small_model, bad):
    message = f"input_ids: token id {bad} is outside the vocabulary of 96 ids (0 to 95)"
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(bad % 7))
    ids[1, 3] = bad
    with pytest.raises(ValueError, match=re.escape(message)):
        qwen3.generate(small_model, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=re.escape(message)):
        qwen3.generate(small_model, [[1, 2], [3, bad, 4]], max_new_tokens=2)
    qwen3.generate(small_model, [[1, 2], [3, 95, 0]], max_new_tokens=2)  # the edges are fine


def test_a_forward_longer_than_the_context_is_a_clear_error(small_model):
    ids = torch.randint(0, 96, (1, 17))
    with pytest.raises(ValueError, match=r"input_ids: 17 tokens exceed the model's context of 16"):
        small_model(ids)
    with pytest.raises(ValueError, match=r"17 tokens exceed"):
        small_model.hidden_states(ids)
    assert small_model(ids[:, :16]).shape == (1, 16, 96)  # the whole context is fine


def test_a_negative_speculative_draft_is_a_clear_error(small_model):
    with pytest.raises(ValueError, match=r"speculative: must be a number of draft tokens >= 0 \(0 = off\), found -2"):
        qwen3.generate(small_model, [[1, 2, 3]], max_new_tokens=4, speculative=-2)
