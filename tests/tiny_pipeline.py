"""A whole tiny Qwen-Image checkpoint in the released layout, and its diffusers pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from helpers import RELEASED_SCHEDULER, randomize_vae, write_model_index
from tiny_tokenizer import build_tokenizer
from tiny_transformer import build_transformer
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

TEXT_HIDDEN = 16
SCHEDULER = RELEASED_SCHEDULER


def build_text_encoder(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=TEXT_HIDDEN, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=152064,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 0]},
        ),
        vision_config=dict(
            depth=1, hidden_size=16, num_heads=2, out_hidden_size=TEXT_HIDDEN,
            intermediate_size=16, fullatt_block_indexes=[0],
        ),
        vision_start_token_id=151652, vision_end_token_id=151653,
        image_token_id=151655, video_token_id=151656,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise)
    return model


def build_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    z = 4
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=z, dim_mult=[1, 2, 4], num_res_blocks=1,
        temperal_downsample=[False, True], latents_mean=[0.1 * i for i in range(z)],
        latents_std=[1 + 0.1 * i for i in range(z)],
    ).eval()  # fmt: skip
    randomize_vae(vae, seed)
    return vae


def build_checkpoint(root: Path) -> tuple[Path, QwenImagePipeline]:
    """Save every component as the released checkpoint is laid out; return the reference."""
    transformer = build_transformer("diffusers", std=0.2, joint_attention_dim=TEXT_HIDDEN)
    text_encoder = build_text_encoder()
    vae = build_vae()
    transformer.save_pretrained(root / "transformer", max_shard_size="20KB")
    text_encoder.save_pretrained(root / "text_encoder", max_shard_size="200KB")
    vae.save_pretrained(root / "vae")
    build_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    write_model_index(root, ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"])
    ref = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=Qwen2Tokenizer.from_pretrained(root / "tokenizer"),
        transformer=transformer,
    )
    ref.set_progress_bar_config(disable=True)
    return root, ref
