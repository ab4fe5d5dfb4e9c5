"""The `qwen3` command end to end on a fake Hub snapshot (real tokenizer files, random weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import qwen3
from qwen3.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def greedy_text(directory, prompt: str, n: int) -> str:
    tok = qwen3.load_tokenizer(directory)
    ids = qwen3.generate(qwen3.load_model(directory), [tok.encode(prompt, allow_special=True)], n,
                         eos_token_ids=tok.eos_token_ids)[0].tolist()  # fmt: skip
    return tok.decode([i for i in ids if i not in tok.eos_token_ids])


def test_generate_streams_the_greedy_continuation(fake_snapshot, capsys):
    code, out, err = run(capsys, "generate", "--model", str(fake_snapshot), "--temperature", "0",
                         "--max-new-tokens", "12", "The capital of France is")  # fmt: skip
    assert code == 0, err
    assert out == greedy_text(fake_snapshot, "The capital of France is", 12) + "\n"


def test_generate_chat_json(fake_snapshot, capsys):
    code, out, _ = run(capsys, "generate", "--model", str(fake_snapshot), "--chat", "--json", "--seed", "3",
                       "--max-new-tokens", "10", "Hi there")  # fmt: skip
    assert code == 0
    result = json.loads(out)
    tok = qwen3.load_tokenizer(fake_snapshot)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
    assert result["prompt_tokens"] == len(tok.encode(prompt, allow_special=True))
    assert 1 <= result["completion_tokens"] <= 10
    assert {"reasoning", "content", "tool_calls", "finish_reason", "seconds", "tokens_per_second"} <= set(result)
    assert result["finish_reason"] in ("eos", "length")


def test_generate_no_think_uses_the_empty_think_block(fake_snapshot, capsys):
    code, out, _ = run(capsys, "generate", "--model", str(fake_snapshot), "--chat", "--no-think", "--json",
                       "--temperature", "0", "--max-new-tokens", "4", "Hi")  # fmt: skip
    tok = qwen3.load_tokenizer(fake_snapshot)
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<think>\n\n</think>\n\n")
    assert json.loads(out)["prompt_tokens"] == len(tok.encode(prompt, allow_special=True))


def test_generate_reads_stdin(fake_snapshot, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time"))
    code, out, _ = run(capsys, "generate", "--model", str(fake_snapshot), "--temperature", "0",
                       "--max-new-tokens", "6")  # fmt: skip
    assert code == 0 and out == greedy_text(fake_snapshot, "Once upon a time", 6) + "\n"


def test_info_of_the_0_6b_config(fake_snapshot, capsys):
    code, out, _ = run(capsys, "info", "--preset", "0.6B", "--context", "1000", "--json")
    info = json.loads(out)
    assert code == 0
    assert info["parameters"] == 596_049_920
    assert info["parameters_non_embedding"] == 596_049_920 - 151936 * 1024
    assert info["weights_bytes"]["bfloat16"] == 2 * 596_049_920
    assert info["kv_cache_bytes_per_token_bf16"] == 112 * 1024
    assert info["kv_cache_bytes_per_token_mha_bf16"] == 224 * 1024  # 16 KV heads
    assert info["kv_cache_bytes_bf16"] == 112 * 1024 * 1000
    assert info["gqa_saving"] == 0.5  # 8 KV heads instead of 16
    code, out, _ = run(capsys, "info", "--model", str(fake_snapshot))
    assert code == 0 and "parameters:" in out and "GQA saving: 50%" in out
    # By component, counted by hand from the shapes: 28 layers of q (1024 -> 2048), k and v (1024 -> 1024),
    # o (2048 -> 1024) plus q_norm and k_norm (128 each); gate, up and down (1024 x 3072); two norms a layer
    # and the final norm; the head is the embedding (tied).
    attention = 28 * (1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024 + 2 * 128)
    mlp = 28 * 3 * 1024 * 3072
    norms = 28 * 2 * 1024 + 1024
    assert info["parameters_by_component"] == {
        "embedding": 151936 * 1024, "attention": attention, "mlp": mlp, "norms": norms, "lm_head": 0
    }  # fmt: skip


@pytest.mark.parametrize("preset", ["0.6B", "8B"])  # tied and untied LM head
def test_info_plot_draws_the_memory_breakdown(tmp_path, capsys, preset):
    import matplotlib.image

    path = tmp_path / "memory.png"
    code, out, _ = run(capsys, "info", "--preset", preset, "--plot", str(path))
    assert code == 0 and f"memory plot: {path}" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 300 and image.shape[1] >= 600
    assert (image[..., :3] < 0.9).any(axis=-1).mean() > 0.02  # drawn on, not blank
    assert [p.name for p in tmp_path.iterdir()] == ["memory.png"]  # no temporary file left behind
    code, out, _ = run(capsys, "info", "--preset", preset, "--json")
    by_component = json.loads(out)["parameters_by_component"]
    assert sum(by_component.values()) == json.loads(out)["parameters"]
    assert (by_component["lm_head"] == 0) == (preset == "0.6B")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "/nonexistent/model", "x"], "no such model directory: /nonexistent/model"),
        (["generate", "--temperature", "-1", "x"], "temperature"),
        (["generate", "--top-p", "1.5", "x"], "top_p"),
        (["generate", "--max-new-tokens", "40960", "x"], "exceeds the model's context of 40960 tokens"),
        (["info", "--preset", "7B"], "unknown '7B'"),
    ],
)
def test_user_errors_are_one_line(fake_snapshot, capsys, argv, message):
    if "--model" not in argv and argv[0] == "generate":
        argv = [*argv[:1], "--model", str(fake_snapshot), *argv[1:]]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_offline_without_cache_says_so_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "qwen3.cli", "generate", "hello"], capture_output=True, text=True,
                         env=env, timeout=120)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "offline" in out.stderr and "--model PATH" in out.stderr


def test_every_command_has_help(capsys):
    for command in ("generate", "chat", "info", "train", "merge-lora"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: qwen3 " + command in capsys.readouterr().out


def test_chat_in_a_terminal(fake_snapshot):
    """Two turns, a /no_think, an /exit, driven through a pseudo-terminal like a person would."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "qwen3.cli", "chat", "--model", str(fake_snapshot),
                                           "--max-new-tokens", "6", "--temperature", "0"],
                          encoding="utf-8", timeout=120, env={**os.environ, "TERM": "dumb"})  # fmt: skip
    child.expect("qwen3 chat")
    child.expect("> ")
    child.sendline("Hello, who are you?")
    child.expect(r"\[\d+ tokens, [\d.]+ tok/s\]")
    child.expect("> ")
    child.sendline("/no_think")
    child.expect(r"\(thinking off\)")
    child.expect(r"> \[no_think\] ")
    child.sendline("And now?")
    child.expect(r"\[\d+ tokens, [\d.]+ tok/s\]")
    child.expect(r"> \[no_think\] ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_quantize_command_and_int8_generation(fake_snapshot, tmp_path, capsys):
    out_dir = tmp_path / "int8"
    code, out, err = run(capsys, "quantize", "--model", str(fake_snapshot), "--out", str(out_dir))
    assert code == 0, err
    config = json.loads((out_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qwen3_int8"
    assert (out_dir / "tokenizer.json").exists()
    model = qwen3.load_model(out_dir)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    code, from_file, _ = run(capsys, "generate", "--model", str(out_dir), "--temperature", "0",
                             "--max-new-tokens", "8", "--dtype", "bfloat16", "Hello")  # fmt: skip
    assert code == 0
    code, at_load, _ = run(capsys, "generate", "--model", str(fake_snapshot), "--quantize", "int8",
                           "--temperature", "0", "--max-new-tokens", "8", "--dtype", "bfloat16", "Hello")  # fmt: skip
    assert code == 0 and at_load == from_file  # quantizing at load == loading the quantized checkpoint


def test_generate_speculative_equals_plain(fake_snapshot, capsys):
    prompt = "one two three four one two three four one two three"
    argv = ["generate", "--model", str(fake_snapshot), "--temperature", "0", "--max-new-tokens", "12", prompt]
    _, plain, _ = run(capsys, *argv)
    code, fast, _ = run(capsys, *argv, "--speculative", "4")
    assert code == 0 and fast == plain


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_chat(fake_snapshot):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "qwen3.cli", "chat", "--model", str(fake_snapshot),
                                           "--max-new-tokens", "20000", "--temperature", "1", "--top-k", "0",
                                           "--top-p", "1"],
                          encoding="utf-8", timeout=120, env={**os.environ, "TERM": "dumb"})  # fmt: skip
    child.expect("> ")
    child.sendline("Tell me a very long story.")
    child.expect("story.\r\n")  # the terminal's echo of the line
    child.expect(r"\S")  # the answer has started streaming
    child.sendintr()
    child.expect(r"\[\d+ tokens, [\d.]+ tok/s \(interrupted\)\]")
    child.expect("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
