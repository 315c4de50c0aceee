"""Atomic writes: the destination holds the old or the new content, never a torn file or a leftover."""

import os

import pytest
import torch
from safetensors.torch import load_file

from astcli import files


def test_text_and_bytes_replace_the_file_and_leave_nothing_else(tmp_path):
    path = tmp_path / "out.json"
    files.write_text(path, "first\n")
    files.write_text(path, "zweite Zeile é\n")
    assert path.read_text(encoding="utf-8") == "zweite Zeile é\n"
    files.write_bytes(tmp_path / "raw", b"\x00\xff")
    assert (tmp_path / "raw").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "raw"]


def test_new_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    files.write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    files.save_torch({"step": 1}, path)
    with pytest.raises(RuntimeError, match="disk gone"), files.atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk gone")
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_tensors_round_trip_as_float32(tmp_path):
    state = {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3).t(), "b": torch.ones(2, dtype=torch.bfloat16)}
    files.save_tensors(state, tmp_path / "m.safetensors")
    back = load_file(str(tmp_path / "m.safetensors"))
    assert back["w"].dtype == torch.float32 and torch.equal(back["w"], state["w"].float())
    assert torch.equal(back["b"], torch.ones(2))
