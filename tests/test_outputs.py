"""Outputs and request checks: exclusive creation, fallbacks, and one-line ValueErrors."""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest

from qwen_mlx import checks
from qwen_mlx.outputs import OutputError, check_outputs, save_exclusive


def writer(data: bytes):
    return lambda p: p.write_bytes(data)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "img.png"
    out.write_bytes(b"mine")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        check_outputs([out])
    check_outputs([out], overwrite=True)
    assert save_exclusive(out, writer(b"new"), overwrite=True) == (out, None)
    assert out.read_bytes() == b"new"


def test_output_that_is_a_folder_or_under_a_file_is_refused(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_outputs([tmp_path / "dir.png"], overwrite=True)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(OutputError, match="is a file"):
        check_outputs([tmp_path / "file" / "sub" / "a.png"])
    check_outputs([tmp_path / "new" / "deeper" / "a.png"])  # creatable: fine
    assert not (tmp_path / "new").exists()  # and nothing created by the check


def test_unwritable_folder_is_refused_up_front(tmp_path, monkeypatch):
    real = type(tmp_path).write_bytes

    def denied(self, data):
        if self.parent == tmp_path / "ro":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(type(tmp_path), "write_bytes", denied)
    with pytest.raises(OutputError, match="cannot write in .*ro: Permission denied"):
        check_outputs([tmp_path / "ro" / "a.png"])


def test_exclusive_creation_never_clobbers(tmp_path):
    """Eight writers racing for one name: one gets it, the others get fallbacks, all intact."""
    out = tmp_path / "race.png"
    results, barrier = [], threading.Barrier(8)

    def run(i):
        barrier.wait()
        results.append((i, *save_exclusive(out, writer(f"image {i}".encode()))))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    paths = [p for _, p, _ in results]
    assert len(set(paths)) == 8 and paths.count(out) == 1
    for i, path, why in results:
        assert path.read_bytes() == f"image {i}".encode()
        assert (why is None) == (path == out)
        if why:
            assert "created by someone else meanwhile" in why and path.name.startswith("race.")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_fallback_when_the_folder_fails_at_the_end(tmp_path, monkeypatch):
    target = tmp_path / "gone" / "img.png"
    target.parent.mkdir()
    target.parent.chmod(0o500)
    real_link = os.link

    def link(src, dst, *a, **k):
        if str(dst).startswith(str(target.parent)):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.chdir(tmp_path)
    path, why = save_exclusive(target, writer(b"work"))
    assert why == f"cannot write {target}: Permission denied"
    assert path == tmp_path / "img.1.png" and path.read_bytes() == b"work"
    target.parent.chmod(0o700)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: checks.check_size(0, 64), "height 0 is too small; the minimum is 16"),
        (lambda: checks.check_size(64, 100000), "width 100000 is too large; the largest"),
        (lambda: checks.check_size(64, 64.0), "width must be an integer"),
        (lambda: checks.check_size(64, 70), "not a multiple of 16; use 64 or 80"),
        (lambda: checks.check_steps(10**9), "at most 1000, got 1000000000"),
        (lambda: checks.check_steps(0), "num_inference_steps must be at least 1, got 0"),
        (lambda: checks.check_steps(2.5), "must be an integer"),
        (lambda: checks.check_cfg(math.nan), "finite number, got nan"),
        (lambda: checks.check_cfg(math.inf), "finite number, got inf"),
        (lambda: checks.check_seeds([-1]), "seed -1 is out of range"),
        (lambda: checks.check_seeds([2**64]), "out of range; seeds go from 0 to"),
        (lambda: checks.check_seeds([2**64 - 1], batch=2), "seed 18446744073709551615 is out"),
        (lambda: checks.check_seeds([1.5]), "a seed must be an integer, got 1.5"),
        (lambda: checks.check_seeds([True]), "a seed must be an integer"),
        (lambda: checks.check_prompts([]), "non-empty list of strings, got []"),
        (lambda: checks.check_prompts(["a", 3]), "must hold strings, got 3"),
        (lambda: checks.check_prompts(None), "must be a string or a non-empty list"),
        (lambda: checks.check_sigmas([1.0, 0.5], 3), "one value per step (3)"),
        (lambda: checks.check_sigmas([1.0, 0.0], 2), "must lie in (0, 1]"),
        (lambda: checks.check_sigmas([1.5, 0.5], 2), "must lie in (0, 1]"),
        (lambda: checks.check_sigmas([0.5, 0.8], 2), "must not increase"),
        (lambda: checks.check_sigmas([1.0, math.nan], 2), "must lie in (0, 1]"),
    ],
)
def test_request_checks(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value)


def test_request_checks_accept_good_values():
    checks.check_size(1328, 1664)
    assert checks.check_steps(np.int64(50)) == 50
    assert checks.check_seeds([0, 2**64 - 1]) == [0, 2**64 - 1]
    assert checks.check_cfg(4) == 4.0
    assert checks.check_prompts("a") == ["a"]
    assert checks.check_sigmas([1.0, 0.5, 0.5], 3).tolist() == [1.0, 0.5, 0.5]
