"""The atomic writer: files get the umask's mode like open(), and a failed write leaves the target untouched."""

import os

import pytest
import torch
from safetensors.torch import save_file

from qwen3.files import atomic_path, write_bytes_atomic, write_text_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "reference", "w"):
            pass
        write_text_atomic(tmp_path / "a.json", "{}")
        write_bytes_atomic(tmp_path / "b.bin", b"\x00")
        with atomic_path(tmp_path / "c.safetensors") as tmp:  # safetensors writes its own private temporary file
            save_file({"x": torch.zeros(2)}, tmp)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (tmp_path / "reference").stat().st_mode & 0o777 == expected
    for name in ["a.json", "b.bin", "c.safetensors"]:
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
    assert (tmp_path / "a.json").read_text() == "{}"


def test_failed_write_leaves_target_and_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
