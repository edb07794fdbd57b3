"""Progress events of a conversion: one per component start and per shard written.

``convert_checkpoint(..., progress=callback)`` calls ``callback(ConvertProgress)`` beside its
``log`` messages; ``qwen_mlx.progress.Progress`` renders them (``event.update()``).
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_mlx.progress import Update


@dataclass(frozen=True)
class ConvertProgress:
    """Where the conversion of one component stands. Bytes are the source shards' sizes."""

    component: str  # "transformer", "text_encoder", "vae"
    shard: int  # shards done (0: the component is starting)
    shards: int
    bytes_done: int
    bytes_total: int
    elapsed: float  # seconds since this component started

    @property
    def finished(self) -> bool:
        return self.shard >= self.shards

    @property
    def rate(self) -> float | None:
        """Source bytes per second so far (None before the first shard)."""
        return self.bytes_done / self.elapsed if self.bytes_done and self.elapsed > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before the first shard)."""
        rate = self.rate
        return (self.bytes_total - self.bytes_done) / rate if rate else None

    def update(self) -> Update:
        """The renderer's view (``qwen_mlx.progress``)."""
        rate = self.rate
        return Update(
            self.component,
            self.bytes_done,
            self.bytes_total,
            "bytes",
            detail=f"shard {self.shard}/{self.shards}",
            rate=f"{rate / 1e6:.0f} MB/s" if rate else "",
            eta=self.eta,
        )
