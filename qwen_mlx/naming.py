"""Weight-name mapping as short lists of regex rules (the converter's and the LoRA loader's)."""

from __future__ import annotations

import re
from collections.abc import Sequence

Rule = tuple[str, str]

# diffusers QwenImageTransformer2DModel names -> qwen_mlx.models.transformer names.
TRANSFORMER_RULES: tuple[Rule, ...] = (
    (r"^transformer_blocks\.", "blocks."),
    (r"_mod\.1\.", "_mod."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"_mlp\.net\.0\.proj\.", "_mlp.up."),
    (r"_mlp\.net\.2\.", "_mlp.down."),
    (r"^time_text_embed\.timestep_embedder\.", "time_embed."),
)


def rename(name: str, rules: Sequence[Rule]) -> str:
    """Apply every (pattern, replacement) rule in order."""
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name
