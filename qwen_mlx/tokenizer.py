"""Qwen2 byte-level BPE tokenizer on the ``tokenizers`` library alone (no transformers at run time).

It reproduces transformers' ``Qwen2Tokenizer`` as diffusers calls it
(``tokenizer(texts, max_length=..., padding=True, truncation=True)``): the same ids, the same
padding token and side, the same truncation. The checkpoint's ``tokenizer/`` folder is read as is:
``tokenizer.json`` when present, otherwise ``vocab.json`` + ``merges.txt`` + the added tokens of
``tokenizer_config.json`` (the released Qwen-Image folder has no ``tokenizer.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

# transformers' Qwen2Tokenizer pre-tokenizer split (single digits, unlike GPT-4's 1-3 digits).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
DEFAULT_PAD = "<|endoftext|>"


@dataclass
class Batch:
    """A padded batch: ``input_ids`` and ``attention_mask`` (B, T) int32, plus per-row counts."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    lengths: list[int]  # valid tokens per row after truncation


def _token_content(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _build_from_vocab(folder: Path, config: dict) -> Tokenizer:
    """Qwen2Tokenizer's construction from vocab.json + merges.txt (transformers 5)."""
    vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges: list[tuple[str, str]] = []
    for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        a, b = line.split(" ")
        merges.append((a, b))
    added = sorted(
        ((int(i), tok) for i, tok in config.get("added_tokens_decoder", {}).items()),
        key=lambda item: item[0],
    )
    # Added tokens go into the model vocabulary at their stated ids, so that add_tokens below
    # reuses those ids instead of appending.
    for idx, tok in added:
        vocab.setdefault(tok["content"], idx)
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    add_prefix_space = bool(config.get("add_prefix_space") or False)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokens = [
        AddedToken(
            tok["content"],
            single_word=tok.get("single_word", False),
            lstrip=tok.get("lstrip", False),
            rstrip=tok.get("rstrip", False),
            normalized=tok.get("normalized", not tok.get("special", False)),
            special=tok.get("special", False),
        )
        for _, tok in added
    ]
    tokenizer.add_tokens(tokens)
    # Special tokens named in the config but not listed among the added tokens.
    named = [_token_content(config.get(k)) for k in ("eos_token", "pad_token", "unk_token")]
    named += [_token_content(t) for t in config.get("additional_special_tokens", []) or []]
    extra = [t for t in named if t and tokenizer.token_to_id(t) is None]
    if extra:
        tokenizer.add_special_tokens(extra)
    for idx, tok in added:
        got = tokenizer.token_to_id(tok["content"])
        if got != idx:
            raise ValueError(f"added token {tok['content']!r} got id {got}, expected {idx}")
    return tokenizer


class QwenTokenizer:
    """Batch tokenization with Hugging Face padding/truncation semantics."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        pad_token: str = DEFAULT_PAD,
        padding_side: str = "right",
        truncation_side: str = "right",
    ) -> None:
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise ValueError("padding_side and truncation_side must be 'left' or 'right'")
        self.tokenizer = tokenizer
        self.pad_token_id = pad_id
        self.padding_side = padding_side
        self.truncation_side = truncation_side

    @classmethod
    def from_folder(cls, folder: str | Path) -> QwenTokenizer:
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = (
            json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        )
        if (folder / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tokenizer = _build_from_vocab(folder, config)
        else:
            raise FileNotFoundError(
                f"no tokenizer in {folder}: expected tokenizer.json or vocab.json + merges.txt"
            )
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return cls(
            tokenizer,
            pad_token=_token_content(config.get("pad_token")) or DEFAULT_PAD,
            padding_side=config.get("padding_side", "right"),
            truncation_side=config.get("truncation_side", "right"),
        )

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, untruncated and unpadded."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def __call__(self, texts: list[str], max_length: int | None = None) -> Batch:
        """Like ``tokenizer(texts, max_length=..., padding=True, truncation=True)``."""
        return self.pad(self.encode(texts), max_length)

    def truncate(self, rows: list[list[int]], max_length: int) -> list[list[int]]:
        """Cut each row to ``max_length`` tokens on the configured truncation side."""
        if self.truncation_side == "right":
            return [r[:max_length] for r in rows]
        return [r[max(len(r) - max_length, 0) :] for r in rows]

    def pad(self, rows: list[list[int]], max_length: int | None = None) -> Batch:
        """Truncate each row to ``max_length`` and pad the batch to its longest row."""
        if max_length is not None:
            rows = self.truncate(rows, max_length)
        lengths = [len(r) for r in rows]
        width = max(lengths, default=0)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if self.padding_side == "right" else slice(width - len(r), width)
            ids[i, sl] = r
            mask[i, sl] = 1
        return Batch(ids, mask, lengths)
