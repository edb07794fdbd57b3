"""Prompt encoding with images for Qwen-Image-Edit (Edit, Edit-2509, Edit-2511).

Reproduces diffusers' ``QwenImageEditPipeline.encode_prompt`` and
``QwenImageEditPlusPipeline.encode_prompt``:

- the Edit chat template (one ``<|vision_start|><|image_pad|><|vision_end|>`` before the prompt),
  or the EditPlus one where each image gets ``Picture i: <|vision_start|><|image_pad|>
  <|vision_end|>`` in front of the prompt;
- each ``<|image_pad|>`` expanded to the image's merged patch count (patches / 4), as the
  Qwen2-VL processor does, and the vision tower's features placed at those tokens;
- Qwen2.5-VL's 3D mRoPE positions (transformers' ``get_rope_index``): text tokens advance one
  position on all three axes; an image's tokens sit at (start, start + row, start + column) on
  the (temporal, height, width) axes, and the text after it resumes at start + max(rows, cols);
- the last layer's hidden states of the valid tokens with the first 64 (the template's system
  prefix) dropped, right-padded with zeros to the batch's longest, mask None when all are valid.
  Nothing is truncated (diffusers' Edit pipelines do not cut prompts).

Note on the reference: diffusers 0.42.1 calls the text encoder without ``mm_token_type_ids``,
which transformers 5 needs to build the 3D positions; there the image tokens silently get 1D
text positions. Transformers 4.x (what the Edit pipelines were written and the model trained
with) derives them from the input ids. We follow the model: 3D positions, always.
"""

from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from qwen_mlx.image_processing import ImageProcessor
from qwen_mlx.loading import load_component
from qwen_mlx.models.text_encoder import Qwen25VLTextModel, QwenTextEncoder
from qwen_mlx.models.vision import VisionTransformer
from qwen_mlx.tokenizer import QwenTokenizer

_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
    "texture, objects, background), then explain how the user's text instruction should alter or "
    "modify the image. Generate a new image that meets the user's requirements while maintaining "
    "consistency with the original input where appropriate.<|im_end|>\n"
)
EDIT_TEMPLATE = (
    _SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_PLUS_TEMPLATE = _SYSTEM + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PICTURE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
EDIT_TEMPLATE_DROP = 64
IMAGE_PAD = "<|image_pad|>"


@dataclass
class ImageFeatures:
    """The vision tower's output for a list of images: ``features`` (sum of tokens, hidden) in
    image order, ``grids`` (n, 3) patch grids, ``tokens`` merged tokens per image."""

    features: mx.array
    grids: np.ndarray
    tokens: list[int]


def rope_index(
    ids: np.ndarray, image_token_id: int, grids: np.ndarray, merge: int
) -> tuple[np.ndarray, int]:
    """(3, T) mRoPE positions of one row of valid tokens, and how many images it used.

    Each maximal run of image tokens is the next image (transformers groups the same way).
    """
    pos = np.zeros((3, len(ids)), dtype=np.int64)
    current, image, i = 0, 0, 0
    for is_image, run in itertools.groupby(ids.tolist(), key=lambda t: t == image_token_id):
        n = len(list(run))
        if not is_image:
            pos[:, i : i + n] = np.arange(current, current + n)
            current += n
        else:
            if image >= len(grids):
                raise ValueError("more image placeholders than images")
            t, h, w = (int(v) // d for v, d in zip(grids[image], (1, merge, merge), strict=True))
            if t * h * w != n:
                raise ValueError(f"image {image} has {n} tokens, its grid needs {t * h * w}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            pos[0, i : i + n] = tt.reshape(-1) + current
            pos[1, i : i + n] = hh.reshape(-1) + current
            pos[2, i : i + n] = ww.reshape(-1) + current
            current += max(h, w)
            image += 1
        i += n
    return pos, image


def select_valid(
    hidden: mx.array, attention_mask: np.ndarray, drop: int
) -> tuple[mx.array, mx.array | None]:
    """Each row's valid tokens past ``drop``, left-aligned and zero-padded (float32), and the
    mask (None when all ones): diffusers' ``_extract_masked_hidden`` + drop + pad."""
    B = attention_mask.shape[0]
    kept = [np.flatnonzero(row)[drop:] for row in attention_mask]
    width = max(len(k) for k in kept)
    index = np.zeros((B, max(width, 1)), dtype=np.int32)
    valid = np.zeros((B, max(width, 1)), dtype=np.int32)
    for i, k in enumerate(kept):
        index[i, : len(k)] = k
        valid[i, : len(k)] = 1
    index, valid = index[:, :width], valid[:, :width]
    picked = mx.take_along_axis(hidden, mx.array(index)[..., None], axis=1)
    embeds = mx.where(mx.array(valid)[..., None] != 0, picked.astype(mx.float32), 0.0)
    return embeds, (None if valid.all() else mx.array(valid))


class QwenEditTextEncoder(QwenTextEncoder):
    """Prompt + images encoder for Qwen-Image-Edit: tokenizer, language model, vision tower and
    image processor. ``plus`` selects the EditPlus (2509/2511) template."""

    drop_idx: int = EDIT_TEMPLATE_DROP

    def __init__(
        self,
        model: Qwen25VLTextModel,
        tokenizer: QwenTokenizer,
        vision: VisionTransformer,
        image_processor: ImageProcessor,
        plus: bool = False,
        image_token_id: int | None = None,
    ) -> None:
        super().__init__(model, tokenizer)
        self.vision: VisionTransformer | None = vision
        self.image_processor = image_processor
        self.plus = plus
        token = tokenizer.token_to_id(IMAGE_PAD)
        if token is None:
            raise ValueError(f"the tokenizer has no {IMAGE_PAD} token")
        if image_token_id is not None and image_token_id != token:
            raise ValueError(
                f"text encoder image_token_id {image_token_id} is not the tokenizer's "
                f"{IMAGE_PAD} ({token})"
            )
        self.image_token_id = token
        merge = vision.config.spatial_merge_size
        if image_processor.merge_size != merge or image_processor.patch_size != (
            vision.config.patch_size
        ):
            raise ValueError(
                "processor and vision tower disagree on patch/merge size: "
                f"{image_processor.patch_size}/{image_processor.merge_size} vs "
                f"{vision.config.patch_size}/{merge}"
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | mx.Dtype | None = None,
        tokenizer: str | Path | QwenTokenizer | None = None,
        image_processor: str | Path | ImageProcessor | None = None,
        plus: bool = False,
    ) -> QwenEditTextEncoder:
        """Load a ``text_encoder/`` folder (language model and vision tower; converted, or
        converted in memory in bfloat16), the tokenizer and the image processor (default: the
        ``tokenizer/`` and ``processor/`` folders beside it). ``dtype`` casts the weights."""
        path = Path(path)
        config, weights = load_component(path, dtype, convert_dtype="bfloat16")
        tokenizer = path.parent / "tokenizer" if tokenizer is None else tokenizer
        image_processor = path.parent / "processor" if image_processor is None else image_processor
        return cls.from_weights(
            config, weights, tokenizer, image_processor, plus, dtype=dtype, where=str(path)
        )

    @classmethod
    def from_weights(
        cls,
        config: dict,
        weights: dict[str, mx.array],
        tokenizer: str | Path | QwenTokenizer,
        image_processor: str | Path | ImageProcessor,
        plus: bool = False,
        dtype: str | mx.Dtype | None = None,
        where: str = "text_encoder",
    ) -> QwenEditTextEncoder:
        """From a text_encoder config and its converted weights (``language_model.*`` and
        ``visual.*``), a tokenizer (or folder) and an image processor (or ``processor/``)."""
        text = QwenTextEncoder.from_weights(config, weights, tokenizer, dtype, where)
        vision = VisionTransformer.from_weights(config, weights, dtype, where)
        if not isinstance(image_processor, ImageProcessor):
            image_processor = ImageProcessor.from_folder(image_processor)
        return cls(
            text.model, text.tokenizer, vision, image_processor, plus, config.get("image_token_id")
        )

    def _vision(self) -> VisionTransformer:
        if self.vision is None:
            raise RuntimeError("the text encoder's weights were freed; load it again")
        return self.vision

    def prompt_text(self, prompt: str, n_images: int) -> str:
        """The templated text for one prompt (placeholders not yet expanded)."""
        if not self.plus:
            if n_images != 1:
                raise ValueError(f"Qwen-Image-Edit takes exactly one image, got {n_images}")
            return EDIT_TEMPLATE.format(prompt)
        pictures = "".join(PICTURE_TEMPLATE.format(i + 1) for i in range(n_images))
        return EDIT_PLUS_TEMPLATE.format(pictures + prompt)

    def encode_images(self, images: list[Image.Image]) -> ImageFeatures:
        """Run the processor and the vision tower once over ``images`` (already sized as the
        pipeline wants them: the processor then snaps them to multiples of 28)."""
        pixel_values, grids = self.image_processor(images)
        vision = self._vision()
        features = vision(mx.array(pixel_values).astype(vision.dtype), grids)
        tokens = [self.image_processor.merged_tokens(g) for g in grids]
        return ImageFeatures(features, grids, tokens)

    def encode(
        self,
        prompts: list[str] | str,
        images: list[Image.Image] | Image.Image | ImageFeatures,
        max_sequence_length: int | None = None,
    ) -> tuple[mx.array, mx.array | None]:
        """Prompt embeddings (B, T, hidden) float32 and mask (B, T) int32 (None if all ones).

        Every prompt sees the same images; their vision features are computed once. Pass an
        ``ImageFeatures`` to reuse features across calls (prompt and negative prompt).
        ``max_sequence_length`` is accepted for symmetry and ignored, as in diffusers' Edit
        pipelines (prompts are never truncated).
        """
        del max_sequence_length
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        if isinstance(images, Image.Image):
            images = [images]
        feats = images if isinstance(images, ImageFeatures) else self.encode_images(list(images))
        n_images = len(feats.tokens)

        pad = self.image_token_id
        rows = []
        for prompt, row in zip(
            prompts,
            self.tokenizer.encode([self.prompt_text(p, n_images) for p in prompts]),
            strict=True,
        ):
            slots = [i for i, t in enumerate(row) if t == pad]
            if len(slots) != n_images:
                raise ValueError(
                    f"prompt {prompt!r} contains {IMAGE_PAD} itself; remove it from the prompt"
                )
            expanded: list[int] = []
            last = 0
            for slot, n in zip(slots, feats.tokens, strict=True):
                expanded += row[last:slot] + [pad] * n
                last = slot + 1
            rows.append(expanded + row[last:])
        batch = self.tokenizer.pad(rows)
        ids, attention = batch.input_ids, batch.attention_mask

        B, T = ids.shape
        positions = np.zeros((3, B, T), dtype=np.int64)
        merge = self._vision().config.spatial_merge_size
        for b in range(B):
            valid = np.flatnonzero(attention[b])
            positions[:, b, valid], _ = rope_index(ids[b, valid], pad, feats.grids, merge)

        model = self._model()
        embeds = model.embed_tokens(mx.array(ids))
        is_image = ids == pad
        # Feature row of each image token: images in order, the same for every prompt.
        feature_index = np.zeros((B, T), dtype=np.int32)
        for b in range(B):
            feature_index[b, is_image[b]] = np.arange(int(is_image[b].sum()))
        placed = feats.features.astype(embeds.dtype)[mx.array(feature_index)]
        embeds = mx.where(mx.array(is_image)[..., None], placed, embeds)

        hidden = model(
            None,
            mx.array(attention),
            position_ids=mx.array(positions.astype(np.int32)),
            input_embeddings=embeds,
        )
        return select_valid(hidden, attention, self.drop_idx)

    def free(self) -> None:
        """Drop the language model's and the vision tower's weights."""
        self.vision = None
        super().free()
        gc.collect()
