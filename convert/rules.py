"""Weight-name mapping as a short list of regex rules."""

from __future__ import annotations

import re
from collections.abc import Sequence

Rule = tuple[str, str]


def rename(name: str, rules: Sequence[Rule]) -> str:
    """Apply every (pattern, replacement) rule in order."""
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name
