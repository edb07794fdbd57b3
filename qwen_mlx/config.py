"""One way to read a component's ``config.json`` into its dataclass config."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import TypeVar

from qwen_mlx.errors import CheckpointError

C = TypeVar("C", bound="ComponentConfig")


@dataclass
class ComponentConfig:
    """Base of every config dataclass (transformer, VAE, text encoder, vision, scheduler).

    ``from_dict`` keeps the keys the dataclass knows (a released config.json carries many
    others: ``_class_name``, ``_diffusers_version``, the converter's ``qwen_mlx`` section...),
    turns JSON lists into tuples where the field's default is a tuple, and lets ``__post_init__``
    check the values. Subclasses reshape nested configs in ``normalize``.
    """

    @classmethod
    def normalize(cls, d: dict) -> dict:
        """Hook: flatten or rename keys before they are matched to fields."""
        return d

    @classmethod
    def from_dict(cls: type[C], d: dict) -> C:
        if not isinstance(d, dict):
            raise CheckpointError(
                f"{cls.__name__}: config must be a JSON object, got {type(d).__name__}"
            )
        d = cls.normalize(dict(d))
        kwargs = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            if (
                isinstance(value, list)
                and f.default is not MISSING
                and isinstance(f.default, tuple)
            ):
                value = tuple(value)
            kwargs[f.name] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:  # a value of the wrong kind or out of range
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{cls.__name__}: {e}") from e
