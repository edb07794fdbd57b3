"""Progress: the converter's events (bytes per shard) and the renderer (plain lines and rich)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from tiny_transformer import build_transformer, save_checkpoint

from qwen_mlx.convert import ConvertOptions, ConvertProgress, convert_checkpoint
from qwen_mlx.progress import Progress, Update, format_bytes, format_seconds, step_update


@pytest.fixture(scope="module")
def converted_events(tmp_path_factory):
    """A sharded tiny checkpoint converted with a progress callback: (source, events)."""
    src = save_checkpoint(build_transformer("diffusers"), tmp_path_factory.mktemp("src"))
    events: list[ConvertProgress] = []
    dst = tmp_path_factory.mktemp("dst") / "out"
    convert_checkpoint(src, dst, ConvertOptions(dtype="float32"), progress=events.append)
    return src, events


def test_convert_reports_each_shard_with_bytes(converted_events):
    """One event when the transformer starts and one per source shard, the bytes being the
    source shards' sizes, adding up to the component's total."""
    src, events = converted_events
    shards = sorted((src / "transformer").glob("*.safetensors"))
    sizes = [p.stat().st_size for p in shards]
    assert len(shards) > 5  # the tiny model really is sharded
    assert {e.component for e in events} == {"transformer"}
    assert [e.shard for e in events] == list(range(len(shards) + 1))
    assert all(e.shards == len(shards) and e.bytes_total == sum(sizes) for e in events)
    assert [e.bytes_done for e in events] == [sum(sizes[:i]) for i in range(len(shards) + 1)]
    assert events[0].eta is None and not events[0].finished
    assert events[-1].finished and events[-1].eta == 0
    elapsed = [e.elapsed for e in events]
    assert elapsed == sorted(elapsed)
    mid = events[2]
    assert mid.eta == pytest.approx(
        (mid.bytes_total - mid.bytes_done) * mid.elapsed / mid.bytes_done
    )
    update = mid.update()
    assert update.label == "transformer" and update.unit == "bytes"
    assert update.detail == f"shard 2/{len(shards)}" and update.rate.endswith("MB/s")


def test_plain_lines_when_not_a_terminal(converted_events):
    _, events = converted_events
    out = io.StringIO()  # not a TTY: one plain line per event
    with Progress(out) as progress:
        assert progress.plain
        for e in events:
            progress(e.update())
    lines = out.getvalue().splitlines()
    assert len(lines) == len(events)
    n = events[-1].shards
    assert lines[0].startswith("transformer: 0 B/") and f"(shard 0/{n})" in lines[0]
    assert f"shard {n}/{n}" in lines[-1] and "left" not in lines[-1]
    assert "left)" in lines[1]


def test_step_events_drive_the_renderer():
    """A denoising step event (index 1-based, total, seconds, elapsed, seed): the mean step
    time gives the rate and the time left."""
    event = SimpleNamespace(index=2, total=5, seconds=1.5, elapsed=4.0, seed=7, latents=None)
    update = step_update(event)
    assert update == Update("seed 7", 2, 5, "steps", rate="2.00 s/step", eta=6.0)
    assert update.line() == "seed 7: 2/5 steps (2.00 s/step, 0:06 left)"
    assert step_update(SimpleNamespace(index=1, total=3, seconds=2.0), "edit").eta == 4.0
    out = io.StringIO()
    with Progress(out, plain=False) as progress:  # rich, onto a non-terminal stream
        progress.step(event)
        progress.step(SimpleNamespace(index=5, total=5, seconds=2.0, elapsed=10.0, seed=7))
    text = out.getvalue()
    assert "seed 7" in text and "5/5 steps" in text and "2.00 s/step" in text


def test_formats():
    assert format_bytes(40.9e9) == "40.9 GB" and format_bytes(512) == "512 B"
    assert format_bytes(3.2e6) == "3.2 MB"
    assert format_seconds(7.4) == "0:07" and format_seconds(275) == "4:35"
    assert format_seconds(3723) == "1:02:03"


def test_cli_convert_prints_progress(tmp_path):
    """``qwen-mlx convert`` off a terminal: one plain progress line per shard on stderr."""
    from typer.testing import CliRunner

    from qwen_mlx.cli import app

    src = save_checkpoint(build_transformer("diffusers"), tmp_path / "src")
    n = len(list((src / "transformer").glob("*.safetensors")))
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("transformer: ")]
    assert len(lines) == n + 1
    assert f"(shard 0/{n})" in lines[0] and f"shard {n}/{n}" in lines[-1]
    total = lines[-1].split(": ")[1].split(" (")[0]
    assert total.split("/")[0] == total.split("/")[1]  # done == total at the end
