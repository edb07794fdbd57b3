"""Weight-name mapping as a short list of regex rules (shared with the runtime's LoRA loader)."""

from qwen_mlx.naming import Rule, rename

__all__ = ["Rule", "rename"]
