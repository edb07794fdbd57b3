"""A tiny Qwen-Image-Edit text encoder (language model + a vision tower deep and wide enough for
window attention to matter), its ``processor/`` folder, and the transformers processor for it.

Vision tower: 4 blocks of width 32 (2 heads of 16), window_size 56 = windows of 2x2 merged cells
(4x4 patches), full attention in block 2 only, so windowed and full blocks both run and most
grids have partial edge windows. Processor: at most 16 merged tokens per image (max_pixels
28*28*16), so the tower sees few patches.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

TEXT_HIDDEN = 32
TEXT = dict(
    hidden_size=TEXT_HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=152064,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]},
)  # fmt: skip
VISION = dict(
    depth=4, hidden_size=32, num_heads=2, intermediate_size=40, out_hidden_size=TEXT_HIDDEN,
    window_size=56, fullatt_block_indexes=[2], patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2,
)  # fmt: skip
IMAGE_TOKEN_ID = 151655
# As the released processor/preprocessor_config.json, with a tiny max_pixels.
PROCESSOR = {
    "min_pixels": 28 * 28 * 2,
    "max_pixels": 28 * 28 * 16,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def build_edit_text_encoder(seed: int = 0, **vision) -> Qwen2_5_VLForConditionalGeneration:
    """Every parameter random: weights N(0, 0.3^2), norm scales 1 + N(0, 0.2^2)."""
    cfg = Qwen2_5_VLConfig(
        text_config=dict(TEXT),
        vision_config=dict(VISION, **vision),
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=151656,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            norm = "norm" in name or "ln_q" in name
            p.copy_(1 + 0.2 * noise if norm else 0.3 * noise)
    return model


def write_processor(folder: Path, **overrides) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(PROCESSOR, **overrides)))
    return folder


class _ImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor (transformers 5's needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def reference_processor(processor_dir: Path, tokenizer_dir: Path) -> Qwen2VLProcessor:
    """The processor diffusers' Edit pipelines call: the PIL image processor from the folder's
    config and the Qwen2 tokenizer."""
    config = json.loads((Path(processor_dir) / "preprocessor_config.json").read_text())
    keys = ("image_processor_type", "processor_class")
    image_processor = Qwen2VLImageProcessorPil(**{k: v for k, v in config.items() if k not in keys})
    return _ImageOnlyProcessor(
        image_processor=image_processor, tokenizer=Qwen2Tokenizer.from_pretrained(tokenizer_dir)
    )


def with_mrope(
    text_encoder: Qwen2_5_VLForConditionalGeneration,
) -> Qwen2_5_VLForConditionalGeneration:
    """Make the reference compute Qwen2.5-VL's 3D positions for image tokens.

    diffusers 0.42.1 calls the text encoder without ``mm_token_type_ids``; transformers 5 then
    falls back to 1D text positions for the image tokens. Transformers 4.x (and the model's
    training) derive them from the input ids, which is what this wrapper restores. When a future
    diffusers passes them itself, the wrapper changes nothing.
    """
    forward = text_encoder.forward

    def patched(*args, input_ids=None, mm_token_type_ids=None, **kwargs):
        if mm_token_type_ids is None and input_ids is not None:
            mm_token_type_ids = (input_ids == IMAGE_TOKEN_ID).int()
        return forward(*args, input_ids=input_ids, mm_token_type_ids=mm_token_type_ids, **kwargs)

    text_encoder.forward = patched
    return text_encoder


# --- whole Edit checkpoints --------------------------------------------------------------------

# Areas the tests shrink diffusers' 1024^2 (VAE) and 384^2 (vision) targets to: with the tiny
# VAE (scale 4) a 128x128 image is 32x32 latents = 256 tokens.
TEST_VAE_AREA = 128 * 128
TEST_CONDITION_AREA = 48 * 48
EDIT_CLASSES = {"edit": "QwenImageEditPipeline", "plus": "QwenImageEditPlusPipeline"}


def build_edit_checkpoint(
    root: Path, flavour: str = "edit", zero_cond_t: bool = False, **transformer
):
    """Save a tiny Edit checkpoint in the released layout (with processor/); return
    (root, diffusers reference pipeline). ``flavour``: "edit" or "plus" (2509/2511);
    ``transformer``: overrides of the tiny transformer's config (e.g. num_attention_heads)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
    )
    from helpers import RELEASED_SCHEDULER, write_model_index
    from tiny_pipeline import build_vae
    from tiny_tokenizer import build_tokenizer
    from tiny_transformer import build_transformer

    transformer = build_transformer(
        "diffusers",
        std=0.2,
        joint_attention_dim=TEXT_HIDDEN,
        zero_cond_t=zero_cond_t,
        **transformer,
    )
    text_encoder = build_edit_text_encoder()
    vae = build_vae()
    transformer.save_pretrained(root / "transformer", max_shard_size="20KB")
    text_encoder.save_pretrained(root / "text_encoder", max_shard_size="200KB")
    vae.save_pretrained(root / "vae")
    build_tokenizer(root / "tokenizer")
    write_processor(root / "processor")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(RELEASED_SCHEDULER))
    write_model_index(root, ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"])
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = EDIT_CLASSES[flavour]
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))

    cls = QwenImageEditPlusPipeline if flavour == "plus" else QwenImageEditPipeline
    processor = reference_processor(root / "processor", root / "tokenizer")
    ref = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(**RELEASED_SCHEDULER),
        vae=vae,
        text_encoder=with_mrope(text_encoder),
        tokenizer=processor.tokenizer,
        processor=processor,
        transformer=transformer,
    )
    ref.set_progress_bar_config(disable=True)
    return root, ref


def shrink_reference_areas(monkeypatch) -> None:
    """Make diffusers' Edit pipelines size images for TEST_VAE_AREA / TEST_CONDITION_AREA."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    for module in (edit, plus):  # the output size is computed at 1024^2 inline in both
        original = module.calculate_dimensions
        monkeypatch.setattr(
            module,
            "calculate_dimensions",
            lambda area, ratio, f=original: f(
                TEST_VAE_AREA if area == 1024 * 1024 else area, ratio
            ),
        )
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", TEST_VAE_AREA)
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", TEST_CONDITION_AREA)
