"""Qwen2.5-VL's language model in MLX, used as Qwen-Image's prompt encoder.

Matches transformers' ``Qwen2_5_VLTextModel`` (the language half of
``Qwen2_5_VLForConditionalGeneration``): GQA attention with q/k/v biases, RMSNorm, SwiGLU MLP
and multimodal RoPE (``mrope_section``: the rotary frequencies are split into temporal / height /
width sections, each rotated by its own row of the (3, B, T) position ids). Text-only prompts use
the same position on all three rows; Edit's image tokens do not.

``QwenTextEncoder.encode`` reproduces diffusers' ``QwenImagePipeline.encode_prompt``: the txt2img
chat template, the last layer's hidden states (after the final norm), valid tokens only with the
first 34 (the template's system prefix) dropped, right-padded with zeros to the batch's longest
prompt, clipped to ``max_sequence_length``, and a mask that is None when every token is valid.

Reused from mlx-lm: ``qwen2.MLP`` (the SwiGLU MLP, same
weight names), ``base.create_causal_mask`` and ``base.scaled_dot_product_attention``
(``mx.fast.scaled_dot_product_attention``: native GQA, softmax in float32). mlx-lm's own
``qwen2_vl`` model is text-only with 1D RoPE, so attention and the decoder layer are ours.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_causal_mask, scaled_dot_product_attention
from mlx_lm.models.qwen2 import MLP

from qwen_mlx.config import ComponentConfig
from qwen_mlx.loading import load_component, load_weights
from qwen_mlx.quantize import group_size_of, quantize_model
from qwen_mlx.tokenizer import QwenTokenizer

# diffusers QwenImagePipeline (txt2img).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP = 34
TOKENIZER_MAX_LENGTH = 1024
LANGUAGE_MODEL_PREFIX = "language_model."


@dataclass
class TextEncoderConfig(ComponentConfig):
    """Language-model hyper-parameters; the defaults are Qwen2.5-VL-7B's."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def normalize(cls, config: dict) -> dict:
        """A Qwen2.5-VL config.json: ``text_config`` nested (transformers 5) or flat (older).

        As in transformers 5, a nested ``text_config`` wins over the flat keys; RoPE settings come
        from ``rope_parameters`` (new) or ``rope_scaling`` + ``rope_theta`` (old).
        """
        text = dict(config.get("text_config") or config)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if "rope_theta" in rope:
            text["rope_theta"] = rope["rope_theta"]
        if "mrope_section" in rope:
            text["mrope_section"] = rope["mrope_section"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"unsupported rope type {rope_type!r} for the text encoder")
        return text

    def __post_init__(self) -> None:
        self.rope_theta = float(self.rope_theta)
        self.mrope_section = list(self.mrope_section)
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )


def mrope_cos_sin(
    position_ids: mx.array, head_dim: int, theta: float, sections: list[int], dtype: mx.Dtype
) -> tuple[mx.array, mx.array]:
    """cos, sin of shape (B, 1, T, head_dim) for position ids (3, B, T).

    Frequency ``j`` of section ``s`` is rotated by row ``s`` of the position ids (transformers'
    ``recomposition_frequencies``), then the half is repeated for rotate-half RoPE.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = mx.array((1.0 / (np.float32(theta) ** exponents)).astype(np.float32))
    freqs = position_ids.astype(mx.float32)[..., None] * inv_freq  # (3, B, T, head_dim/2)
    parts, start = [], 0
    for axis, n in enumerate(sections):
        parts.append(freqs[axis % 3, ..., start : start + n])
        start += n
    freqs = mx.concatenate(parts, axis=-1)
    emb = mx.concatenate([freqs, freqs], axis=-1)[:, None]
    return mx.cos(emb).astype(dtype), mx.sin(emb).astype(dtype)


def _rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        dim = cfg.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)

    def __call__(
        self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | str | None
    ) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = scaled_dot_product_attention(q, k, v, cache=None, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(
        self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | str | None
    ) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_mask_4d(attention_mask: mx.array | None) -> mx.array | str:
    """Causal plus key padding, as a boolean (B, 1, T, T) mask ("causal" when nothing is padded).

    Each token may also always attend to itself: that changes nothing for valid tokens, and keeps
    fully padded query rows (left padding) finite instead of NaN, so they cannot poison anything.
    """
    if attention_mask is None or bool(mx.all(attention_mask != 0).item()):
        return "causal"
    T = attention_mask.shape[-1]
    valid = (attention_mask != 0)[:, None, None, :]
    eye = mx.arange(T)[:, None] == mx.arange(T)[None]
    return (create_causal_mask(T)[None, None] & valid) | eye


class Qwen25VLTextModel(nn.Module):
    """The language model: embeddings, decoder layers, final norm (no lm_head)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype it computes in (the scales' dtype when the embedding is quantized)."""
        emb = self.embed_tokens
        return emb.scales.dtype if "scales" in emb else emb.weight.dtype

    def __call__(
        self,
        input_ids: mx.array | None,
        attention_mask: mx.array | None = None,
        position_ids: mx.array | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        """Last hidden states (B, T, hidden) in the weight dtype, after the final norm.

        ``position_ids``: (3, B, T) multimodal positions, (B, T) text positions, or None for
        ``arange(T)`` on every row (what transformers 5 uses for text-only input, whatever the
        padding: RoPE is relative, so a left-padding offset does not change valid tokens).
        ``input_embeddings`` (B, T, hidden) replaces the token embedding lookup (Edit: image
        features scattered into the placeholder tokens). Hidden states at padded positions are
        meaningless.
        """
        if input_embeddings is None:
            if input_ids is None:
                raise ValueError("pass input_ids or input_embeddings")
            input_embeddings = self.embed_tokens(input_ids)
        B, T = input_embeddings.shape[:2]
        if position_ids is None:
            position_ids = mx.broadcast_to(mx.arange(T)[None, None], (3, B, T))
        elif position_ids.ndim == 2:
            position_ids = mx.broadcast_to(position_ids[None], (3, B, T))
        cfg = self.config
        h = input_embeddings
        cos, sin = mrope_cos_sin(
            position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, h.dtype
        )
        mask = attention_mask_4d(attention_mask)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.norm(h)


class QwenTextEncoder:
    """Prompt encoder: tokenizer + language model, with diffusers' ``encode_prompt`` semantics.

    To release the weights (about 15 GB in bf16 for the 7B model) once prompts are encoded, call
    ``free()`` or simply drop every reference to the encoder; ``free()`` also clears MLX's buffer
    cache. The vision tower's weights are never read here (``visual.*`` stays on disk).
    """

    prompt_template: str = PROMPT_TEMPLATE
    drop_idx: int = PROMPT_TEMPLATE_DROP
    tokenizer_max_length: int = TOKENIZER_MAX_LENGTH

    def __init__(self, model: Qwen25VLTextModel, tokenizer: QwenTokenizer) -> None:
        self.model: Qwen25VLTextModel | None = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | mx.Dtype | None = None,
        tokenizer: str | Path | QwenTokenizer | None = None,
    ) -> QwenTextEncoder:
        """Load a ``text_encoder/`` folder (converted, or a Hugging Face one converted in memory
        in bfloat16) and the tokenizer (default: the ``tokenizer/`` folder beside it).

        ``dtype`` ("float32", "bfloat16", "float16") casts the weights; None keeps the stored
        dtype. Weights load lazily: nothing is read until the first forward pass.
        """
        path = Path(path)
        config, weights = load_component(path, dtype, convert_dtype="bfloat16")
        tokenizer = path.parent / "tokenizer" if tokenizer is None else tokenizer
        return cls.from_weights(config, weights, tokenizer, dtype=dtype, where=str(path))

    @classmethod
    def from_weights(
        cls,
        config: dict,
        weights: dict[str, mx.array],
        tokenizer: str | Path | QwenTokenizer,
        dtype: str | mx.Dtype | None = None,
        where: str = "text_encoder",
    ) -> QwenTextEncoder:
        """From a text_encoder config and its converted weights (``language_model.*`` is loaded,
        ``visual.*`` ignored) plus a tokenizer or its folder; ``dtype`` casts the weights."""
        model = Qwen25VLTextModel(TextEncoderConfig.from_dict(config))
        n = len(LANGUAGE_MODEL_PREFIX)
        lm = {k[n:]: v for k, v in weights.items() if k.startswith(LANGUAGE_MODEL_PREFIX)}
        quantize_model(model, lm, group_size_of(config))  # where .scales say so
        load_weights(model, lm, where, dtype)
        if not isinstance(tokenizer, QwenTokenizer):
            tokenizer = QwenTokenizer.from_folder(tokenizer)
        return cls(model, tokenizer)

    def _model(self) -> Qwen25VLTextModel:
        if self.model is None:
            raise RuntimeError("the text encoder's weights were freed; load it again")
        return self.model

    @property
    def dtype(self) -> mx.Dtype:
        return self._model().dtype

    def __call__(self, *args, **kwargs) -> mx.array:
        """Last hidden states (B, T, hidden), after the final norm, in the weight dtype; the
        arguments are ``Qwen25VLTextModel.__call__``'s."""
        return self._model()(*args, **kwargs)

    def encode(
        self, prompts: list[str] | str, max_sequence_length: int = 512
    ) -> tuple[mx.array, mx.array | None]:
        """Prompt embeddings (B, T, hidden) float32 and mask (B, T) int32, or None if all ones.

        Over-long prompts are cut as diffusers cuts them: the templated text is truncated to
        ``tokenizer_max_length + drop_idx`` tokens, the embeddings to ``max_sequence_length``.
        Because attention is causal, tokens past what is kept cannot change the kept ones, so they
        are dropped before the forward pass instead of after it.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        if max_sequence_length < 1:
            raise ValueError("max_sequence_length must be at least 1")
        drop = self.drop_idx
        rows = self.tokenizer.encode([self.prompt_template.format(p) for p in prompts])
        full = [len(r) for r in rows]
        rows = self.tokenizer.truncate(rows, self.tokenizer_max_length + drop)
        rows = [r[: max_sequence_length + drop] for r in rows]
        batch = self.tokenizer.pad(rows)
        keep = min(self.tokenizer_max_length, max_sequence_length) + drop
        dropped = [f - k for f, k in zip(full, batch.lengths, strict=True)]
        if max(dropped) > 0:
            worst = int(np.argmax(dropped))
            warnings.warn(
                f"prompt too long: {max(dropped)} token(s) dropped from prompt {worst} "
                f"({full[worst] - drop} tokens with the template's tail; the limit is "
                f"{keep - drop}, from max_sequence_length={max_sequence_length} and the "
                f"tokenizer limit {self.tokenizer_max_length}); "
                f"{sum(d > 0 for d in dropped)} of {len(prompts)} prompt(s) truncated",
                stacklevel=2,
            )

        hidden = self(mx.array(batch.input_ids), mx.array(batch.attention_mask))

        # Each row's valid tokens past the template prefix, left-aligned, zeros after them.
        lengths = [max(n - drop, 0) for n in batch.lengths]
        width = max(lengths)
        index = np.zeros((len(prompts), max(width, 1)), dtype=np.int32)
        valid = np.zeros((len(prompts), max(width, 1)), dtype=np.int32)
        for i, row in enumerate(batch.attention_mask):
            pos = np.flatnonzero(row)[drop:]
            index[i, : len(pos)] = pos
            valid[i, : len(pos)] = 1
        index, valid = index[:, :width], valid[:, :width]
        picked = mx.take_along_axis(hidden, mx.array(index)[..., None], axis=1)
        embeds = mx.where(mx.array(valid)[..., None] != 0, picked.astype(mx.float32), 0.0)
        mask = None if valid.all() else mx.array(valid)
        return embeds, mask

    def free(self) -> None:
        """Drop the language model's weights and clear MLX's cache; ``encode`` then raises."""
        self.model = None
        gc.collect()
        mx.clear_cache()
