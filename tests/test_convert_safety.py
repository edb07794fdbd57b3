"""The converter never loses a user's data (issue 10): what DST may be, what --force replaces,
races, interrupted runs, permissions, and every input checked before anything is written."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import convert_tiny
from tiny_transformer import build_transformer, save_checkpoint
from typer.testing import CliRunner

import qwen_mlx.convert.convert as convert_module
from qwen_mlx.cli import app
from qwen_mlx.convert import ConversionError, ConvertOptions, convert_checkpoint, is_converted
from qwen_mlx.convert.destination import OWNER_FILE

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One tiny diffusers checkpoint, copied per test (building it costs a torch model)."""
    return save_checkpoint(build_transformer("diffusers"), tmp_path_factory.mktemp("ck") / "src")


@pytest.fixture
def src(pristine, tmp_path):
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "src"))


def cli(*args: str):
    return runner.invoke(app, ["convert", *map(str, args)])


def one_line_error(res, *needles: str) -> str:
    """Exit code 2, one `error:` line naming the problem, never a traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], res.output
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary folders, set-aside folders and locks of conversions to parent/name."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- what DST may be


def test_dst_is_src_is_refused_even_with_force(src):
    before = snapshot(src)
    one_line_error(cli(src, src, "--force"), "is the source checkpoint itself")
    one_line_error(cli(src, src / "transformer" / "..", "--force"), "source checkpoint itself")
    assert snapshot(src) == before


def test_dst_containing_src_is_refused_even_with_force(src, tmp_path):
    (tmp_path / "notes.txt").write_text("unrelated")
    before = snapshot(tmp_path)
    one_line_error(cli(src, tmp_path, "--force"), "contains the source checkpoint")
    assert snapshot(tmp_path) == before


def test_dst_inside_src_is_refused(src):
    before = snapshot(src)
    one_line_error(cli(src, src / "mlx"), "lies inside the source checkpoint")
    one_line_error(cli(src, src / "transformer" / "x", "--force"), "inside the source")
    assert snapshot(src) == before and not (src / "mlx").exists()


def test_dst_reached_through_a_symlink_is_still_the_source(src, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(src)
    one_line_error(cli(link, src, "--force"), "source checkpoint itself")
    one_line_error(cli(src, link / "out"), "inside the source")


def test_force_refuses_a_folder_that_is_not_a_checkpoint(src, tmp_path):
    dst = tmp_path / "photos"
    dst.mkdir()
    (dst / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    line = one_line_error(cli(src, dst, "--force"), "neither empty nor a qwen-mlx checkpoint")
    assert "remove it yourself" in line
    assert (dst / "holiday.jpg").read_bytes() == b"\xff\xd8 precious"
    # a folder whose model_index.json lacks the qwen_mlx section is not ours either
    (dst / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    one_line_error(cli(src, dst, "--force"), "neither empty nor a qwen-mlx checkpoint")
    assert leftovers(tmp_path, "photos") == []


def test_force_replaces_an_empty_folder_and_a_converted_checkpoint(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    assert cli(src, dst, "--force").exit_code == 0
    assert is_converted(dst)
    (dst / "transformer" / "stale.safetensors").write_bytes(b"old")
    res = cli(src, dst, "--force", "--dtype", "float16")
    assert res.exit_code == 0, res.output
    assert not (dst / "transformer" / "stale.safetensors").exists()
    assert json.loads((dst / "model_index.json").read_text())["qwen_mlx"]["dtype"] == "float16"
    assert leftovers(tmp_path, "out") == []  # the old checkpoint set aside was removed


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_dst_a_file_or_a_symlink_is_a_one_line_error(src, tmp_path, force):
    file = tmp_path / "model.bin"
    file.write_bytes(b"data")
    one_line_error(cli(src, file, *force), "is a file, not a folder")
    assert file.read_bytes() == b"data"
    target = tmp_path / "real"
    convert_tiny(src, target)
    link = tmp_path / "link"
    link.symlink_to(target)
    before = snapshot(target)
    one_line_error(cli(src, link, *force), "is a symbolic link")
    assert link.is_symlink() and snapshot(target) == before


def test_read_only_destination_is_a_one_line_error(src, tmp_path, monkeypatch):
    """A folder we may not write in (simulated: the tests may run as root, who may write)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir, real_write = pathlib.Path.mkdir, pathlib.Path.write_text

    def denied(path):
        return PermissionError(13, "Permission denied", str(path))

    def mkdir(self, *a, **k):
        if ro in self.parents:
            raise denied(self)
        return real_mkdir(self, *a, **k)

    def write_text(self, *a, **k):
        if ro in self.parents:
            raise denied(self)
        return real_write(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    one_line_error(cli(src, ro / "out"), "cannot write", "Permission denied")
    one_line_error(cli(src, ro / "a" / "b" / "out"), "cannot create", "Permission denied")
    assert list(ro.iterdir()) == []


# ----------------------------------------------------------------------------- the final step


def hook_first_component(monkeypatch, action):
    """Run ``action()`` when the converter starts writing its first component."""
    original = convert_module.convert_component

    def hooked(*args, **kwargs):
        action()
        return original(*args, **kwargs)

    monkeypatch.setattr(convert_module, "convert_component", hooked)


def test_dst_appearing_meanwhile_is_left_untouched(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"

    def someone_else():
        dst.mkdir()
        (dst / "theirs.txt").write_text("not yours")

    hook_first_component(monkeypatch, someone_else)
    with pytest.raises(ConversionError, match="appeared during the conversion") as e:
        convert_tiny(src, dst)
    assert (dst / "theirs.txt").read_text() == "not yours"
    kept = Path(str(e.value).rsplit("kept as ", 1)[1])
    assert kept.parent == tmp_path and kept.name.startswith("out.converted-")
    assert is_converted(kept) and not (kept / OWNER_FILE).exists()
    assert leftovers(tmp_path, "out") == []  # no temp folder, no lock


def test_force_never_replaces_what_appeared_meanwhile_unchecked(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    hook_first_component(monkeypatch, lambda: (dst.mkdir(), (dst / "x.txt").write_text("x")))
    with pytest.raises(ConversionError, match="was left untouched.*kept as") as e:
        convert_checkpoint(src, dst, ConvertOptions(dtype="float32"), force=True)
    assert "changed into something --force does not replace" in str(e.value)
    assert (dst / "x.txt").read_text() == "x"


def test_keyboard_interrupt_removes_the_temp_folder_and_created_parents(src, tmp_path, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    hook_first_component(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_tiny(src, tmp_path / "a" / "b" / "out")
    assert_nothing_written(tmp_path)


# ----------------------------------------------------------------------------- races and signals

HOOKED_CLI = """
import os, sys, time
import qwen_mlx.convert.convert as cc
started, sleep = os.environ.get("TEST_STARTED"), float(os.environ.get("TEST_SLEEP", "0"))
original = cc.convert_component
def slow(*a, **k):
    if started:
        open(started, "w").close()
    time.sleep(sleep)
    return original(*a, **k)
cc.convert_component = slow
from qwen_mlx.cli import app
app()
"""


def start_cli(*args, started: Path | None = None, sleep: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TEST_SLEEP=str(sleep))
    if started is not None:
        env["TEST_STARTED"] = str(started)
    return subprocess.Popen(
        [sys.executable, "-c", HOOKED_CLI, "convert", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started"
        time.sleep(0.05)


def test_second_conversion_to_one_dst_is_refused_while_the_first_runs(src, tmp_path):
    dst, started = tmp_path / "out", tmp_path / "started"
    first = start_cli(src, dst, "--force", started=started, sleep=3.0)
    wait_for(started, first)
    second = start_cli(src, dst, "--force")
    _, err2 = second.communicate(timeout=120)
    _, err1 = first.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 2, err2
    assert f"another conversion (PID {first.pid}) is writing {dst}" in err2
    assert "Traceback" not in err2
    assert is_converted(dst) and leftovers(tmp_path, "out") == []


def test_two_simultaneous_conversions_exactly_one_succeeds(src, tmp_path):
    dst = tmp_path / "out"
    procs = [start_cli(src, dst, sleep=0.5) for _ in range(2)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (loser,) = [err for code, err in results if code == 2]
    assert "another conversion" in loser or "already exists" in loser, loser
    assert is_converted(dst) and leftovers(tmp_path, "out") == []


def test_sigterm_leaves_no_temp_folder(src, tmp_path):
    dst, started = tmp_path / "deep" / "out", tmp_path / "started"
    proc = start_cli(src, dst, started=started, sleep=30.0)
    wait_for(started, proc)
    assert leftovers(dst.parent, "out")  # the temp folder and the lock exist while it runs
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert "removed the temporary folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "started"]  # parents too


def test_stale_temp_folders_and_locks_of_dead_runs_are_removed(src, tmp_path):
    dst = tmp_path / "out"
    stale = tmp_path / ".out.tmp-deadbeef"
    (stale / "transformer").mkdir(parents=True)
    (stale / "transformer" / "model-00001.safetensors").write_bytes(b"\0" * 1000)
    pid = dead_pid()
    (stale / OWNER_FILE).write_text(f"{pid}\n")
    (tmp_path / ".out.lock").write_text(f"{pid}\n")
    orphan = tmp_path / ".out.tmp-0ldversn"  # no owner recorded: not ours to judge
    orphan.mkdir()
    res = cli(src, dst)
    assert res.exit_code == 0, res.output
    assert f"removed {stale}, left by an interrupted conversion (PID {pid})" in res.output
    assert f"took over {tmp_path / '.out.lock'}" in res.output
    assert f"note: {orphan}" in res.output
    assert not stale.exists() and orphan.exists() and is_converted(dst)
    assert leftovers(tmp_path, "out") == [orphan.name]


def test_a_replaced_checkpoint_set_aside_by_a_dead_run_is_restored(src, tmp_path):
    """A run killed between moving the old DST aside and renaming the new one in."""
    old = convert_tiny(src, tmp_path / "old")
    aside = tmp_path / ".out.old-12345678"
    old.rename(aside)
    (aside / OWNER_FILE).write_text(f"{dead_pid()}\n")
    dst = tmp_path / "out"
    res = cli(src, dst)  # no --force: the restored DST now exists
    one_line_error(res, "already exists")
    assert f"restored {dst}" in res.output and is_converted(dst) and not aside.exists()


# ----------------------------------------------------------------------------- permissions


def test_converted_folders_get_normal_permissions(src, tmp_path):
    old = os.umask(0o022)
    try:
        dst = convert_tiny(src, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o755
    assert stat.S_IMODE((dst / "transformer").stat().st_mode) == 0o755
    assert stat.S_IMODE((dst / "model_index.json").stat().st_mode) == 0o644


def test_failed_conversion_leaves_no_parent_folders(src, tmp_path):
    shard = sorted((src / "transformer").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: found by the header check
    one_line_error(cli(src, tmp_path / "x" / "y" / "out"), shard.name)
    assert_nothing_written(tmp_path)


def test_disk_full_is_a_one_line_error_leaving_nothing(src, tmp_path, monkeypatch):
    def full():
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    hook_first_component(monkeypatch, full)
    one_line_error(cli(src, tmp_path / "x" / "y" / "out"), "No space left on device")
    assert_nothing_written(tmp_path)


# ----------------------------------------------------------------------------- inputs


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def assert_nothing_written(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_layers", 3, "num_layers is 3 but the weights have 2"),
        ("attention_head_dim", 8, "attention_head_dim is 8 but the weights have 16"),
        ("num_attention_heads", 4, "num_attention_heads is 4 but the weights have 3"),
        ("joint_attention_dim", 32, "joint_attention_dim is 32 but the weights have 16"),
        ("out_channels", 8, "proj_out.weight is (16, 48) in the weights, (32, 48) by the config"),
    ],
)
def test_config_not_matching_the_weights_fails_at_convert_time(src, tmp_path, key, value, message):
    edit_json(src / "transformer" / "config.json", **{key: value})
    line = one_line_error(cli(src, tmp_path / "x" / "out"), message)
    assert str(src / "transformer" / "config.json") in line
    assert_nothing_written(tmp_path)


def test_index_naming_a_file_outside_the_component_is_refused(src, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "secret.safetensors").write_bytes(b"x")
    index = next((src / "transformer").glob("*.index.json"))
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    for bad in ("../../other/secret.safetensors", "/etc/passwd", "weights.npz"):
        data["weight_map"][first] = bad
        index.write_text(json.dumps(data))
        one_line_error(cli(src, tmp_path / "out"), repr(bad), "only .safetensors files inside")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "src"]


def test_unknown_variant_is_refused_before_anything_runs(src, tmp_path, monkeypatch):
    touched = []
    monkeypatch.setattr(convert_module, "check_component_folder", lambda *a: touched.append(a))
    one_line_error(cli(src, tmp_path / "out", "--variant", "qwen-image-9999x"), "unknown model")
    assert touched == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "relative, content, message",
    [
        ("transformer/config.json", "[1, 2]", "must hold a JSON object, not list"),
        ("transformer/config.json", '"text"', "must hold a JSON object, not str"),
        ("model_index.json", "null", "must hold a JSON object, not NoneType"),
        ("transformer/config.json", '{"num_layers": 2,', "is not valid JSON"),
    ],
)
def test_bad_json_is_a_one_line_error_naming_the_file(src, tmp_path, relative, content, message):
    (src / relative).write_text(content)
    line = one_line_error(cli(src, tmp_path / "out"), message)
    assert str(src / relative) in line
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("length", [2**62, 2**40, 10**6])
def test_absurd_shard_header_length_is_a_one_line_error(src, tmp_path, length):
    shard = sorted((src / "transformer").glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(length.to_bytes(8, "little") + data[8:])
    one_line_error(cli(src, tmp_path / "out"), str(shard), f"header claims {length} bytes")
    assert_nothing_written(tmp_path)


def test_header_entry_outside_the_file_is_refused(src, tmp_path):
    shard = sorted((src / "transformer").glob("*.safetensors"))[0]
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**9
    raw = json.dumps(header).encode()
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    one_line_error(cli(src, tmp_path / "out"), f"bad header entry for tensor {name!r}")
