"""The `qwen3` command end to end on a fake Hub snapshot (real tokenizer files, random weights)."""

from __future__ import annotations

import io
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
        (["generate", "--model", "demo/", "x"], "no such model directory: demo/ (the shipped demo model is --model"),
        (["generate", "--temperature", "-1", "x"], "--temperature -1.0: must be a finite number >= 0"),
        (["generate", "--top-p", "1.5", "x"], "--top-p 1.5: must be in (0, 1]"),
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
    for command in ("generate", "chat", "info", "quantize", "train", "merge-lora", "serve", "batch"):
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
    assert model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.int8
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


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading a model (or launching torchrun) fail the test: flag errors must come before it."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded (or processes launched) before the flags were checked")

    for name in ("load_model", "load_model_tp", "launch_tensor_parallel"):
        monkeypatch.setattr(f"qwen3.cli.{name}", loaded)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--temperature", "-1", "x"], "--temperature -1.0: must be a finite number >= 0"),
        (["generate", "--top-p", "1.5", "x"], "--top-p 1.5: must be in (0, 1]"),
        (["generate", "--top-k", "-3", "x"], "--top-k -3: must be an integer >= 0"),
        (["generate", "--repetition-penalty", "0", "x"], "--repetition-penalty 0.0: must be a finite number > 0"),
        (["chat", "--min-p", "2"], "--min-p 2.0: must be in [0, 1]"),
        (["generate", "--max-new-tokens", "-1", "x"], "--max-new-tokens -1: must be >= 0"),
        (["generate", "--stop", "", "x"], "--stop: an empty stop string would end every answer"),
        (["generate", "--stop", "ok", "--stop", "", "x"], "--stop: an empty stop string"),
        (["generate", "--speculative", "-2", "x"], "--speculative -2: must be a number of draft tokens >= 0"),
        (["generate", "--speculative", "3", "--temperature", "0.7", "x"], "greedy only; add --temperature 0"),
        (["generate", "--speculative", "3", "x"], "greedy only"),  # the model's generation config samples
        (["generate", "--device", "cuda", "x"], "device 'cuda': no CUDA GPU available to torch on this machine"),
        (["chat", "--device", "cuda:1"], "device 'cuda:1': no CUDA GPU available"),
        (["generate", "--device", "mps", "x"], "device 'mps': MPS (Apple GPU) is not available on this machine"),
        (["generate", "--device", "gpu0", "x"], "device 'gpu0': not a device name"),
        (["generate", "--tp", "2", "--device", "cuda", "x"], "device 'cuda': no CUDA GPU"),  # before torchrun
        (["train", "--preset", "0.6B", "--data", "none.txt", "--out", "none", "--device", "cuda"], "device 'cuda'"),
        (["generate", "--tp", "2", "--quantize", "int8", "x"], "--quantize: not supported with --tp"),
        (["generate", "--tp", "0", "x"], "--tp 0: must be a number of processes >= 1"),
        (["chat", "--max-model-len", "0"], "--max-model-len 0: must be a number of tokens > 0"),
        (["info", "--preset", "0.6B", "--context", "-5"], "--context -5: must be a number of tokens > 0"),
        (["info", "--preset", "0.6B", "--context", "0"], "--context 0: must be a number of tokens > 0"),
        (["info", "--preset", "0.6B", "--plot", "memory.bmp"], "--plot memory.bmp: '.bmp'; the file name must end"),
        (["info", "--preset", "0.6B", "--plot", "memory"], "--plot memory: no suffix"),
    ],
)
def test_flag_errors_are_one_line_and_come_before_loading(fake_snapshot, capsys, monkeypatch, no_loading, argv,
                                                          message):  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if argv[0] in ("generate", "chat"):
        argv = [*argv[:1], "--model", str(fake_snapshot), *argv[1:]]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("qwen3: error: ") and message in err and err.count("\n") == 1, err


def test_resolve_device_is_one_check_for_every_caller(monkeypatch):
    from qwen3.device import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(DeviceError, match=r"device 'cuda:2': this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert isinstance(DeviceError("x"), ValueError)  # the CLI's one-line errors include ValueError


def test_info_sizes_the_kv_cache_at_the_models_context(capsys):
    demo_context = json.loads((qwen3.hub.DEMO_DIR / "config.json").read_text())["max_position_embeddings"]
    code, out, _ = run(capsys, "info", "--model", "demo", "--json")
    info = json.loads(out)
    assert code == 0 and info["context"] == demo_context == 1024
    assert info["kv_cache_bytes_bf16"] == info["kv_cache_bytes_per_token_bf16"] * demo_context
    code, out, _ = run(capsys, "info", "--model", "demo")
    assert code == 0 and f"at {demo_context:,} tokens" in out
    code, out, _ = run(capsys, "info", "--model", "demo", "--context", "100", "--json")
    assert json.loads(out)["context"] == 100


@pytest.mark.parametrize("suffix, magic", [(".jpg", b"\xff\xd8\xff"), (".pdf", b"%PDF"), (".svg", b"<?xml"),
                                           (".PNG", b"\x89PNG\r\n\x1a\n")])  # fmt: skip
def test_info_plot_writes_the_format_its_suffix_names(tmp_path, capsys, suffix, magic):
    path = tmp_path / f"memory{suffix}"
    code, out, err = run(capsys, "info", "--model", "demo", "--plot", str(path))
    assert code == 0, err
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written atomically: no temporary left


def copy_model(source, directory):
    import shutil

    shutil.copytree(source, directory)
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_quantize_refuses_to_write_over_its_source(fake_snapshot, tmp_path, capsys):
    source = tmp_path / "model"
    before = copy_model(fake_snapshot, source)
    (tmp_path / "link").symlink_to(source, target_is_directory=True)
    for out in (source, tmp_path / "link", f"{source}/"):
        code, _, err = run(capsys, "quantize", "--model", str(source), "--out", str(out), "--overwrite")
        assert code == 2 and "that is the model being read" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "model"]


def test_quantize_replaces_a_non_empty_out_only_with_overwrite(fake_snapshot, tmp_path, capsys):
    out = tmp_path / "int8"
    out.mkdir()
    stale = {"model-00001-of-00002.safetensors": b"another model's shard", "config.json": b"{}"}
    for name, data in stale.items():
        (out / name).write_bytes(data)
    code, _, err = run(capsys, "quantize", "--model", str(fake_snapshot), "--out", str(out))
    assert code == 2 and f"--out {out}: exists and is not empty; pass --overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == stale  # untouched
    code, _, err = run(capsys, "quantize", "--model", str(fake_snapshot), "--out", str(out), "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    )  # the other model's shard is gone, not mixed in
    assert qwen3.load_model(out).model.layers[0].mlp.gate_up_proj.weight.dtype == torch.int8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # no temporary directory left
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", "--model", str(fake_snapshot), "--out", str(out), "--overwrite")
    assert code == 2 and "holds 'notes.txt', not a model file" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_quantize_failure_leaves_out_as_it_was(fake_snapshot, tmp_path, capsys, monkeypatch):
    out = tmp_path / "int8"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qwen3.cli.save_model", fail)
    code, _, err = run(capsys, "quantize", "--model", str(fake_snapshot), "--out", str(out))
    assert code == 2 and "disk full" in err
    assert list(tmp_path.iterdir()) == []  # neither out nor a temporary directory


def test_generate_into_a_closed_pipe_ends_quietly():
    """`qwen3 generate ... | head -1`: no Broken pipe message, the status of a writer ended by SIGPIPE."""
    command = [sys.executable, "-m", "qwen3.cli", "generate", "--model", "demo", "--temperature", "0",
               "--max-new-tokens", "1000", "ROMEO:\n"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.read(1)  # the answer has started streaming
    process.stdout.close()  # the reader goes away, like head after its line
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, err
    assert err == ""


@pytest.mark.parametrize("where", ["qwen3.train.cli.add_subcommands", "qwen3.cli.resolve_model",
                                   "qwen3.cli.load_model", "qwen3.cli.load_tokenizer"])  # fmt: skip
def test_ctrl_c_during_start_up_exits_130_quietly(capsys, monkeypatch, where):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupt)
    code, out, err = run(capsys, "generate", "--model", "demo", "--max-new-tokens", "3", "ROMEO:")
    assert (code, out, err) == (130, "", "\n")


def test_invalid_utf8_in_a_prompt_becomes_replacement_characters(capsys, monkeypatch):
    import io

    raw = b"ROMEO: caf\xc3\xa9 \xff\xe2\x82 ok"  # valid, then an invalid byte and a truncated sequence
    expected = raw.decode("utf-8", errors="replace")
    assert expected == "ROMEO: caf\u00e9 \ufffd\ufffd ok"
    argv = ["generate", "--model", "demo", "--temperature", "0", "--max-new-tokens", "5"]
    code, from_argv, err = run(capsys, *argv, raw.decode("utf-8", errors="surrogateescape"))  # as in sys.argv
    assert code == 0, err
    assert from_argv == greedy_text("demo", expected, 5) + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    code, from_stdin, err = run(capsys, *argv)
    assert (code, err) == (0, "") and from_stdin == from_argv


def test_valid_text_decodes_escaped_bytes_like_errors_replace():
    from qwen3.tokenizer import valid_text as clean_text

    gen = torch.Generator().manual_seed(0)
    alphabet = list(b"ab \n") + [0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 0xFF, 0x80, 0xED, 0xA0]
    for _ in range(300):
        picks = torch.randint(len(alphabet), (int(torch.randint(0, 12, (1,), generator=gen)),), generator=gen)
        raw = bytes(alphabet[i] for i in picks.tolist())
        assert clean_text(raw.decode("utf-8", errors="surrogateescape")) == raw.decode("utf-8", errors="replace")
    assert clean_text("a\ud800b\udfff") == "a\ufffdb\ufffd"  # surrogates that escape no byte
    assert clean_text("plain \u00e9 \U0001f600") == "plain \u00e9 \U0001f600"


def test_a_missing_local_model_is_one_plain_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad").mkdir()
    for model in ("bad/nope", "demo/"):
        code, out, err = run(capsys, "generate", "--model", model, "x")
        assert (code, out) == (2, "")
        assert err.startswith(f"qwen3: error: no such model directory: {model}") and "--model PATH" not in err


# ---------------------------------------------------------------------------------------------------------
# The engine's decode path (the default on CUDA) against generate_text (the plain path), here on the CPU


def run_path(capsys, engine: bool, *argv: str) -> tuple[int, str, str]:
    """`qwen3 ...` in this process with the decode path chosen: the engine (engine=True) or generate_text."""
    from qwen3.cli import build_parser, run_command

    args = build_parser().parse_args(list(argv))
    args.engine = engine
    code = run_command(args, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("seconds", "seconds_to_first_token", "tokens_per_second")}


@pytest.fixture(scope="module")
def demo_with_eos(tmp_path_factory):
    """The demo model whose generation_config also lists, as an EOS id, the 7th token of its greedy continuation
    of "ROMEO:" (the demo itself never stops in a few dozen tokens)."""
    from qwen3.hub import DEMO_DIR

    directory = tmp_path_factory.mktemp("demo-eos")
    for path in DEMO_DIR.iterdir():
        (directory / path.name).symlink_to(path)
    tok = qwen3.load_tokenizer(DEMO_DIR)
    ids = qwen3.generate(qwen3.load_model(DEMO_DIR), [tok.encode("ROMEO:")], 7)[0].tolist()
    config = json.loads((DEMO_DIR / "generation_config.json").read_text())
    (directory / "generation_config.json").unlink()
    (directory / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [4087, ids[6]]}))
    assert ids[6] not in ids[:6]
    return directory


@pytest.mark.parametrize(
    "extra",
    [
        ["--max-new-tokens", "20", "ROMEO:"],  # max tokens
        ["--max-new-tokens", "1", "KING"],
        ["--max-new-tokens", "0", "KING"],
        ["--max-new-tokens", "30", "--stop", "bawd", "--stop", "a man", "First Citizen:"],  # stop strings
        ["--max-new-tokens", "40", "--stop", "spirit\n", "--chat", "--no-think", "Speak, ROMEO"],
    ],
)
def test_generate_on_the_engine_equals_generate_text(capsys, extra):
    argv = ["generate", "--model", "demo", "--temperature", "0", *extra]
    plain, engine = run_path(capsys, False, *argv), run_path(capsys, True, *argv)
    assert plain[0] == 0 and engine == plain
    (_, plain_json, _), (code, engine_json, _) = (run_path(capsys, engine, *argv, "--json") for engine in (False, True))
    plain_json, engine_json = json.loads(plain_json), json.loads(engine_json)
    assert code == 0 and without_timing(engine_json) == without_timing(plain_json)
    if "--stop" in extra:
        assert plain_json["finish_reason"] == "stop"


def test_compile_builds_the_engine_with_compiled_steps_and_the_gemv(capsys, monkeypatch):
    """--compile on the engine path (CUDA) asks single_llm for LLM(compile=True, gemv=True), in generate and in chat;
    here on the CPU the options are recorded, then dropped (both need CUDA), and the text is the plain path's."""
    import qwen3.engine.stream as stream_module

    original, seen = stream_module.single_llm, []

    def recording(model, tok, max_model_len, **options):
        seen.append(options)
        return original(model, tok, max_model_len)

    monkeypatch.setattr(stream_module, "single_llm", recording)
    argv = ["generate", "--model", "demo", "--temperature", "0", "--max-new-tokens", "12", "ROMEO:"]
    compiled, plain = run_path(capsys, True, *argv, "--compile"), run_path(capsys, False, *argv)
    assert compiled[:2] == plain[:2] and plain[2] == ""
    assert compiled[2].startswith("qwen3: compiling the engine's steps") and len(compiled[2].splitlines()) == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/exit\n"))
    chat = ["chat", "--model", "demo", "--temperature", "0", "--max-new-tokens", "4", "--compile"]
    assert run_path(capsys, True, *chat)[0] == 0
    assert seen == [{"compile": True, "gemv": True}] * 2


def test_generate_on_the_engine_stops_at_eos_like_generate_text(demo_with_eos, capsys):
    argv = ["generate", "--model", str(demo_with_eos), "--temperature", "0", "--max-new-tokens", "20", "--json",
            "ROMEO:"]  # fmt: skip
    (_, plain, _), (code, engine, err) = run_path(capsys, False, *argv), run_path(capsys, True, *argv)
    plain, engine = json.loads(plain), json.loads(engine)
    assert code == 0, err
    assert plain["finish_reason"] == "eos" and plain["completion_tokens"] == 6  # the EOS id is not counted
    assert without_timing(engine) == without_timing(plain)


def test_generate_on_the_engine_refuses_what_does_not_fit_like_generate_text(capsys):
    argv = ["generate", "--model", "demo", "--max-new-tokens", "1020", "ROMEO: " * 10]
    plain, engine = run_path(capsys, False, *argv), run_path(capsys, True, *argv)
    assert plain[0] == 2 and "exceeds the model's context of 1024 tokens" in plain[2] and engine == plain


def test_the_engine_is_the_default_decode_path_on_cuda_only():
    from types import SimpleNamespace

    from qwen3.cli import build_parser, engine_options, use_engine

    def on(device: str):
        return SimpleNamespace(lm_head=SimpleNamespace(weight=SimpleNamespace(device=torch.device(device))))

    def engine(device: str, *argv: str) -> bool:
        return use_engine(build_parser().parse_args(list(argv)), on(device))

    for command in (["generate", "x"], ["chat"]):
        assert engine("cuda", *command) and engine("cuda:1", *command)
        assert not engine("cpu", *command) and not engine("mps", *command)
        assert not engine("cuda", *command, "--tp", "2")
        assert engine("cuda", *command, "--compile") and not engine("cpu", *command, "--compile")
        assert engine_options(build_parser().parse_args([*command, "--compile"])) == {"compile": True, "gemv": True}
        assert engine_options(build_parser().parse_args(command)) == {}
    assert not engine("cuda", "generate", "--speculative", "4", "x")


def test_ctrl_c_while_torch_imports_exits_130_quietly():
    """The `qwen3` entry point (qwen3_launcher) catches a Ctrl-C that lands while `import qwen3` still imports
    torch, before any of the CLI's own handlers exist: status 130, no traceback."""
    import re
    import signal

    # -X importtime reports each module on stderr as its import completes: the first torch submodule to complete
    # says that `import torch` is under way (the top-level module completes last), whatever the machine's speed
    command = [sys.executable, "-X", "importtime", "-c", "import sys, qwen3_launcher; sys.exit(qwen3_launcher.main())",
               "generate", "--model", "demo", "--max-new-tokens", "3", "ROMEO:"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen = []
    while not seen or (seen[-1] and not re.search(rb"\|\s+torch\.", seen[-1])):
        seen.append(process.stderr.readline())
    assert seen[-1], b"".join(seen[-5:]).decode()  # a torch submodule, not the end of stderr
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    err = b"".join(seen) + err
    assert process.returncode == 130, err.decode()[-2000:]
    assert b"Traceback" not in err and out == b""


def test_the_launcher_turns_an_interrupted_import_into_status_130(monkeypatch, capsys):
    import importlib.abc

    import qwen3_launcher

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "qwen3.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "qwen3.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    assert qwen3_launcher.main() == 130
    assert capsys.readouterr().err == "\n"


def test_compile_cache_moves_to_the_users_cache_directory_unless_chosen(tmp_path):
    """--compile's cache: $XDG_CACHE_HOME/qwen3/torchinductor (if absolute), else $HOME/.cache/...; a directory the
    user set is kept; a directory that cannot be made leaves torch's default (nothing set)."""
    from qwen3.compile_cache import CACHE_ENV, use_persistent_compile_cache

    env = {"HOME": str(tmp_path / "home")}
    path = use_persistent_compile_cache(env)
    assert path == tmp_path / "home" / ".cache" / "qwen3" / "torchinductor" and path.is_dir()
    assert env[CACHE_ENV] == str(path)
    assert use_persistent_compile_cache(env) is None and env[CACHE_ENV] == str(path)  # set: kept
    env = {"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert use_persistent_compile_cache(env) == tmp_path / "xdg" / "qwen3" / "torchinductor"
    env = {"HOME": str(tmp_path / "home2"), "XDG_CACHE_HOME": "relative/ignored"}
    assert use_persistent_compile_cache(env) == tmp_path / "home2" / ".cache" / "qwen3" / "torchinductor"
    env = {"HOME": str(tmp_path / "home3"), CACHE_ENV: str(tmp_path / "mine")}
    assert use_persistent_compile_cache(env) is None and env[CACHE_ENV] == str(tmp_path / "mine")
    (tmp_path / "file").write_text("in the way")
    env = {"HOME": str(tmp_path / "file")}
    assert use_persistent_compile_cache(env) is None and CACHE_ENV not in env


@pytest.mark.parametrize("flags, moved", [(["--compile"], True), ([], False)])
def test_the_cli_sets_the_compile_cache_before_a_compiled_command(monkeypatch, tmp_path, flags, moved):
    """Every command with --compile (generate, chat, serve, batch, train) points inductor's cache at the user's
    cache directory before it runs; without --compile nothing changes."""
    import qwen3.cli as cli

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # conftest sets torch's default for the tests
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = []
    for argv in (["generate", "--model", "demo", "x"], ["chat", "--model", "demo"], ["serve", "--model", "demo"]):
        args = cli.build_parser().parse_args([*argv, *flags])
        monkeypatch.setattr(args, "func", lambda a: seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR")) or 0)
        assert cli.run_command(args, argv) == 0
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    expected = str(tmp_path / ".cache" / "qwen3" / "torchinductor") if moved else None
    assert seen == [expected] * 3


@pytest.mark.parametrize("command", [["generate", "--max-new-tokens", "2", "ROMEO:"], ["chat"]])
def test_a_compiled_engine_announces_its_compile_before_building(capsys, monkeypatch, tmp_path, command):
    """With --compile the engine compiles before the first token: stderr says so (and where the result is kept)
    before the build starts. On the CPU that build is refused, after the notice; without --compile no notice."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = run_path(capsys, True, command[0], "--model", "demo", "--compile", *command[1:])
    notice = f"qwen3: compiling the engine's steps (minutes the first time; later starts reuse {tmp_path / 'cache'})"
    assert code == 2 and err.splitlines()[0] == notice
    assert err.splitlines()[1].startswith("qwen3: error: LLM: ") and "needs CUDA" in err.splitlines()[1]
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
    code, _, err = run_path(capsys, True, *command[:1], "--model", "demo", *command[1:])
    assert code == 0 and "compiling" not in err
