"""Small random LoRA files in the key layouts found in the wild, and diffusers' reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# Attention, FFN and modulation linears in several blocks, plus top-level linears.
MODULES = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.img_mod.1",
    "transformer_blocks.0.txt_mlp.net.2",
    "transformer_blocks.1.attn.to_out.0",
    "transformer_blocks.1.attn.to_add_out",
    "transformer_blocks.1.img_mlp.net.0.proj",
    "transformer_blocks.1.txt_mod.1",
    "transformer_blocks.2.attn.to_v",
    "transformer_blocks.2.img_mlp.net.2",
)
TOP_LEVEL = ("img_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1")

LAYOUTS = ("peft", "peft_metadata", "peft_default", "kohya", "diffusion_model", "lora_dot", "diff")


def random_factors(model, modules, rank: int, seed: int, std: float = 0.25) -> dict:
    """module -> (lora_A (rank, in), lora_B (out, rank)), both random (not PEFT's zero B)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        w = model.get_submodule(m).weight
        out[m] = (
            torch.randn(rank, w.shape[1], generator=g) * std,
            torch.randn(w.shape[0], rank, generator=g) * std,
        )
    return out


def random_diffs(model, modules, seed: int, std: float = 0.05) -> dict:
    """module -> (weight delta, bias delta)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        lin = model.get_submodule(m)
        out[m] = (
            torch.randn(lin.weight.shape, generator=g) * std,
            torch.randn(lin.bias.shape, generator=g) * std,
        )
    return out


def layout_tensors(layout: str, factors: dict, alpha: float | None) -> tuple[dict, dict | None]:
    """(key -> tensor, safetensors metadata) of ``factors`` in ``layout``."""
    sd, meta = {}, None
    for m, (a, b) in factors.items():
        if layout in ("peft", "peft_metadata"):
            sd[f"transformer.{m}.lora_A.weight"], sd[f"transformer.{m}.lora_B.weight"] = a, b
        elif layout == "peft_default":  # PEFT's own state dict, unprefixed
            sd[f"{m}.lora_A.default.weight"], sd[f"{m}.lora_B.default.weight"] = a, b
        elif layout == "kohya":
            k = "lora_unet_" + m.replace(".", "_")
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = a, b
            if alpha is not None:
                sd[f"{k}.alpha"] = torch.tensor(alpha)
        elif layout == "diffusion_model":  # Lightning
            k = f"diffusion_model.{m}"
            sd[f"{k}.lora_A.weight"], sd[f"{k}.lora_B.weight"] = a, b
            if alpha is not None:
                sd[f"{k}.alpha"] = torch.tensor(alpha)
        elif layout == "lora_dot":
            sd[f"transformer.{m}.lora.down.weight"], sd[f"transformer.{m}.lora.up.weight"] = a, b
        else:
            raise ValueError(layout)
    if layout == "peft_metadata":
        from peft import LoraConfig

        rank = next(iter(factors.values()))[0].shape[0]
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(factors)).to_dict()
        cfg = {f"transformer.{k}": v for k, v in cfg.items()}
        meta = {"lora_adapter_metadata": json.dumps(cfg, default=list)}
    return sd, meta


def diff_tensors(diffs: dict) -> dict:
    sd = {}
    for m, (dw, db) in diffs.items():
        sd[f"diffusion_model.{m}.diff"], sd[f"diffusion_model.{m}.diff_b"] = dw, db
    return sd


def save(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def apply_reference(model, files: list[tuple[Path, float]], diffs: list[tuple[dict, float]] = ()):
    """diffusers' own LoRA loading (the pipeline's lora_state_dict + load_lora_into_transformer,
    then set_adapters with the scales); full deltas (which diffusers does not load for Qwen) are
    added to the weights directly."""
    from diffusers import QwenImagePipeline

    names = []
    for i, (path, _) in enumerate(files):
        sd, meta = QwenImagePipeline.lora_state_dict(
            str(path.parent), weight_name=path.name, return_lora_metadata=True
        )
        QwenImagePipeline.load_lora_into_transformer(
            sd, transformer=model, adapter_name=f"lora{i}", metadata=meta
        )
        names.append(f"lora{i}")
    if names:
        model.set_adapters(names, weights=[s for _, s in files])
    with torch.no_grad():
        for d, scale in diffs:
            for m, (dw, db) in d.items():
                lin = model.get_submodule(m)
                lin = getattr(lin, "base_layer", lin)
                lin.weight.add_(scale * dw)
                lin.bias.add_(scale * db)
    return model
