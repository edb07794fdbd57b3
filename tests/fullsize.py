"""A full-size Qwen-Image checkpoint in the released layout, written straight to safetensors.

The tensor names, shapes and shard layout are the released checkpoint's: the reference models
(diffusers' transformer and VAE, transformers' Qwen2.5-VL) are built on PyTorch's ``meta``
device from the released configs (no memory), and their state dicts give every tensor; the text
encoder's names are the released ones (transformers 4.x: ``model.layers.*``, ``visual.*``).

Two ways to write it (one tensor, one chunk at a time: never whole in memory):
- ``holes=True``: every shard is its header followed by a hole (a sparse file: no disk used).
  Anything that reads headers only (``qwen_mlx.memory``, ``info``, ``--dry-run``) sees the real
  full-size checkpoint; tests use it.
- random bf16 values, for ``scripts/check_fullsize.py`` (about 58 GB at full depth;
  ``layers`` / ``text_layers`` cut the transformer's and the language model's depth, full width).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The released Qwen/Qwen-Image configs (diffusers 0.34 / transformers 4.5x), as shipped.
TRANSFORMER_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "_diffusers_version": "0.34.0.dev0",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 768,
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKLQwenImage",
    "_diffusers_version": "0.34.0.dev0",
    "attn_scales": [],
    "base_dim": 96,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "z_dim": 16,
}  # fmt: skip
_VISION = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
    "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
    "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
}  # fmt: skip
TEXT_ENCODER_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "image_token_id": 151655,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.53.1", "use_cache": True,
    "use_sliding_window": False, "video_token_id": 151656, "vision_config": _VISION,
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
    "vision_token_id": 151654, "vocab_size": 152064,
}  # fmt: skip
# Shard sizes as released: the transformer in 9 files, the text encoder in 4, the VAE in one.
SHARD_BYTES = {"transformer": 5 * 10**9, "text_encoder": 5 * 10**9, "vae": None}
SHARD_STEM = {
    "transformer": "diffusion_pytorch_model",
    "text_encoder": "model",
    "vae": "diffusion_pytorch_model",
}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str = "BF16"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 2


def configs(layers: int | None = None, text_layers: int | None = None) -> dict[str, dict]:
    """The released configs; ``layers`` / ``text_layers`` cut the depth (full width)."""
    t, te = dict(TRANSFORMER_CONFIG), json.loads(json.dumps(TEXT_ENCODER_CONFIG))
    if layers is not None:
        t["num_layers"] = layers
    if text_layers is not None:
        te["num_hidden_layers"] = te["max_window_layers"] = text_layers
    return {"transformer": t, "text_encoder": te, "vae": dict(VAE_CONFIG)}


def _released_name(name: str) -> str:
    """transformers 5's Qwen2.5-VL names -> the released checkpoint's (transformers 4.x)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def tensors(component: str, config: dict) -> list[Tensor]:
    """Every tensor of a released component, in state-dict order (from a ``meta`` model)."""
    import torch
    from diffusers.utils import logging

    logging.set_verbosity_error()  # the released config's unused pooled_projection_dim
    with torch.device("meta"):
        if component == "transformer":
            from diffusers import QwenImageTransformer2DModel

            model = QwenImageTransformer2DModel.from_config(config)
        elif component == "vae":
            from diffusers import AutoencoderKLQwenImage

            model = AutoencoderKLQwenImage.from_config(config)
        else:
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
            keys += ("num_attention_heads", "num_key_value_heads", "rms_norm_eps")
            text = {k: config[k] for k in keys}
            text["rope_parameters"] = {
                "rope_type": "default",
                "rope_theta": config["rope_theta"],
                "mrope_section": config["rope_scaling"]["mrope_section"],
            }
            model = Qwen2_5_VLForConditionalGeneration(
                Qwen2_5_VLConfig(text_config=text, vision_config=config["vision_config"])
            )
        state = model.state_dict()
    return [Tensor(_released_name(k), tuple(v.shape)) for k, v in state.items()]


def _shards(items: list[Tensor], limit: int | None) -> list[list[Tensor]]:
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in items:
        if limit and shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(items: list[Tensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in items:
        span = [offset, offset + t.nbytes]
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": span}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


Fill = Callable[[Tensor, int, int], bytes]  # (tensor, first element, count) -> bf16 bytes


def write_component(
    folder: Path,
    component: str,
    config: dict,
    fill: Fill | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> int:
    """One component folder: config.json, shards (+ index when several). ``fill`` gives the
    data in chunks; None leaves it a hole. Returns the bytes of tensor data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shards = _shards(tensors(component, config), SHARD_BYTES[component])
    stem, n = SHARD_STEM[component], len(shards)
    weight_map, total = {}, 0
    for i, items in enumerate(shards, 1):
        name = f"{stem}.safetensors" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.safetensors"
        head = _header(items)
        size = sum(t.nbytes for t in items)
        with open(folder / name, "wb") as f:
            f.write(head)
            if fill is None:
                f.truncate(len(head) + size)  # a hole: no disk used
            else:
                for t in items:
                    count = t.nbytes // 2
                    for start in range(0, count, CHUNK):
                        f.write(fill(t, start, min(CHUNK, count - start)))
        log(f"{component}: wrote {name} ({size / 1e9:.2f} GB)")
        weight_map.update({t.name: name for t in items})
        total += size
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


CHUNK = 1 << 24  # elements per write (32 MB of bf16)


def random_fill(seed: int = 0) -> Fill:
    """Random bf16 values on a scale that keeps activations finite: norm weights ~1, biases
    ~0.01, other weights uniform with std ~ 1/sqrt(fan_in)."""
    rng = np.random.default_rng(seed)

    def fill(t: Tensor, start: int, count: int) -> bytes:
        leaf = t.name.rsplit(".", 1)[-1]
        if "norm" in t.name and leaf == "weight" or leaf == "gamma":
            values = 1.0 + 0.1 * (rng.random(count, dtype=np.float32) - 0.5)
        elif leaf == "bias" or len(t.shape) == 1:
            values = 0.02 * (rng.random(count, dtype=np.float32) - 0.5)
        else:
            fan_in = math.prod(t.shape[1:])
            values = (rng.random(count, dtype=np.float32) - 0.5) * (3.46 / math.sqrt(fan_in))
        return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()

    return fill


def write_checkpoint(
    root: Path,
    holes: bool = True,
    layers: int | None = None,
    text_layers: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda msg: None,
) -> Path:
    """The whole checkpoint (model_index.json, scheduler, tokenizer, three components)."""
    from helpers import RELEASED_SCHEDULER, write_model_index
    from tiny_tokenizer import build_tokenizer

    root = Path(root)
    fill = None if holes else random_fill(seed)
    for component, config in configs(layers, text_layers).items():
        write_component(root / component, component, config, fill, log)
    build_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(RELEASED_SCHEDULER))
    write_model_index(root, ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"])
    return root
