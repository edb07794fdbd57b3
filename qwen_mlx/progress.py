"""Progress of long work (convert, generate, edit) on stderr, drawn with one library: rich.

A ``Progress`` renders a stream of ``Update`` values: one bar per label with what is done of the
total (bytes or steps), a detail (``shard 3/9``), the rate and the time left. When the stream is
not a terminal (a log file, a pipe, CI) each update is one plain line instead of a redrawn bar.

Producers stay independent of the renderer: the converter emits
``qwen_mlx.convert.ConvertProgress`` events (``.update()`` gives an ``Update``); the denoising
loop's step events become one with ``step_update``::

    with Progress() as progress:
        convert_checkpoint(src, dst, options, progress=lambda e: progress(e.update()))
        for event in pipe.generate(request):
            if isinstance(event, StepEvent):
                progress.step(event)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True)
class Update:
    """Where one piece of work stands."""

    label: str  # e.g. "transformer", "seed 7"
    done: float
    total: float
    unit: str = "bytes"  # "bytes" or "steps"
    detail: str = ""  # e.g. "shard 3/9"
    rate: str = ""  # e.g. "104 MB/s", "12.4 s/step"
    eta: float | None = None  # seconds left (None: not known yet)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def amount(self) -> str:
        if self.unit == "bytes":
            return f"{format_bytes(self.done)}/{format_bytes(self.total)}"
        return f"{int(self.done)}/{int(self.total)} {self.unit}"

    def line(self) -> str:
        """The plain one-line form: ``transformer: 12.3 GB/40.9 GB shard 3/9, 104 MB/s, 4:35
        left``."""
        parts = [p for p in (self.detail, self.rate) if p]
        if self.eta is not None and not self.finished:
            parts.append(f"{format_seconds(self.eta)} left")
        tail = f" ({', '.join(parts)})" if parts else ""
        return f"{self.label}: {self.amount()}{tail}"


def format_bytes(n: float) -> str:
    """Decimal units, as disks and file managers count: 40.9 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_seconds(s: float) -> str:
    """0:07, 4:35, 1:02:03."""
    s = max(0, round(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def step_update(event: Any, label: str | None = None) -> Update:
    """An ``Update`` from a denoising step event: ``index`` (1-based), ``total``, ``seconds``
    (this step) and ``elapsed`` (since the loop began; the mean step time gives the ETA);
    labelled ``seed N`` when the event carries a seed."""
    index, total = int(event.index), int(event.total)
    elapsed = getattr(event, "elapsed", None)
    per = elapsed / index if elapsed and index else float(getattr(event, "seconds", 0.0))
    if label is None:
        seed = getattr(event, "seed", None)
        label = f"seed {seed}" if seed is not None else "denoising"
    return Update(label, index, total, "steps", rate=f"{per:.2f} s/step", eta=per * (total - index))


class Progress:
    """Renders ``Update`` values on ``stream`` (stderr by default): rich bars on a terminal,
    one plain line per update otherwise (or when ``plain``). Use as a context manager."""

    def __init__(self, stream: TextIO | None = None, plain: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if plain is None:
            plain = not (hasattr(self.stream, "isatty") and self.stream.isatty())
        self.plain = plain
        self._rich = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Progress:
        if not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[amount]}"),
                TextColumn("{task.fields[detail]}"),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[left]}"),
                console=Console(file=self.stream),
            )
            self._rich.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        self._tasks.clear()

    def __call__(self, update: Update) -> None:
        if self._rich is None:
            print(update.line(), file=self.stream, flush=True)
            return
        left = "" if update.eta is None or update.finished else f"{format_seconds(update.eta)} left"
        fields = {"amount": update.amount(), "detail": update.detail, "rate": update.rate}
        if update.label not in self._tasks:
            self._tasks[update.label] = self._rich.add_task(
                update.label, total=update.total, left=left, **fields
            )
        self._rich.update(
            self._tasks[update.label],
            completed=update.done,
            total=update.total,
            left=left,
            **fields,
        )

    def step(self, event: Any, label: str | None = None) -> None:
        """Render a denoising step event (see ``step_update``)."""
        self(step_update(event, label))
