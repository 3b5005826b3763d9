"""Cache folders are made once, and a build that fails leaves nothing under the real name."""

import pytest

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
