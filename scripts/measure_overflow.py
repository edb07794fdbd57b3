"""Measure where FP16 would overflow in the VAE and the text encoder of a checkpoint.

Runs each component stage by stage in float32 and prints the largest activation magnitude after
every stage (FP16's limit is 65504), then runs the same inputs with float16 weights and reports
whether the output stays finite and how far it lands from float32. This is the evidence behind
`qwen_mlx.precision.COMPONENT_DTYPES`: run it on the released weights (on a Mac, after
`qwen-mlx convert`) before giving either component an FP16 plan.

    python scripts/measure_overflow.py --model ~/mlx/Qwen-Image --size 512
    python scripts/measure_overflow.py --random-vae      # released VAE config, random weights
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

FP16_MAX = 65504.0
PROMPTS = [
    "A coffee shop sign that reads 'Qwen Coffee 通义咖啡', watercolor",
    "a red fox in the snow, 35mm photo, shallow depth of field",
]


def cast(model: nn.Module, dtype: mx.Dtype) -> None:
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))  # fmt: skip


def report(rows: list[tuple[str, float]]) -> None:
    for name, peak in rows:
        flag = "  <-- over FP16's 65504" if peak > FP16_MAX else ""
        print(f"    {name:28s} max |x| {peak:12.4g}{flag}")


def peak(x: mx.array) -> float:
    return float(mx.abs(x.astype(mx.float32)).max())


def vae_stages(vae, z: mx.array) -> tuple[list[tuple[str, float]], mx.array]:
    dec = vae.decoder
    rows = []
    x = vae.post_quant_conv(z.astype(vae.dtype))
    rows.append(("post_quant_conv", peak(x)))
    x = dec.conv_in(x)
    rows.append(("conv_in", peak(x)))
    x = dec.mid_block(x)
    rows.append(("mid_block", peak(x)))
    for i, block in enumerate(dec.up_blocks):
        x = block(x)
        mx.eval(x)
        rows.append((f"up_blocks.{i}", peak(x)))
    x = dec.conv_out(nn.silu(dec.norm_out(x)))
    rows.append(("conv_out", peak(x)))
    return rows, x


def measure_vae(vae, size: int) -> None:
    h = w = size // vae.scale_factor
    key = mx.random.key(0)
    z = mx.random.normal((1, h, w, vae.config.z_dim), key=key)
    z = z * mx.array(vae.latents_std) + mx.array(vae.latents_mean)
    cast(vae, mx.float32)
    rows, ref = vae_stages(vae, z)
    print(f"  VAE decode {size}x{size}, float32:")
    report(rows)
    cast(vae, mx.float16)
    _, out = vae_stages(vae, z)
    finite = bool(mx.isfinite(out).all())
    err = float(mx.abs(out.astype(mx.float32) - ref).max() / mx.abs(ref).max()) if finite else 0
    print(f"  VAE in float16: finite={finite}" + (f", rel. error {err:.2e}" if finite else ""))


def measure_text_encoder(te) -> None:
    model = te._model()
    batch = te.tokenizer([te.prompt_template.format(p) for p in PROMPTS])
    ids, mask = mx.array(batch.input_ids), mx.array(batch.attention_mask)

    def run(dtype):
        cast(model, dtype)
        from qwen_mlx.models.text_encoder import attention_mask_4d, mrope_cos_sin

        cfg = model.config
        h = model.embed_tokens(ids)
        B, T = ids.shape
        pos = mx.broadcast_to(mx.arange(T)[None, None], (3, B, T))
        cos, sin = mrope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, h.dtype)
        rows = []
        for i, layer in enumerate(model.layers):
            h = layer(h, cos, sin, attention_mask_4d(mask))
            mx.eval(h)
            rows.append((f"layers.{i} (residual)", peak(h)))
        return rows, model.norm(h)

    rows, ref = run(mx.float32)
    print("  text encoder, float32, residual stream after each layer:")
    report(rows)
    _, out = run(mx.float16)
    finite = bool(mx.isfinite(out).all())
    err = float(mx.abs(out.astype(mx.float32) - ref).max() / mx.abs(ref).max()) if finite else 0
    print(
        f"  text encoder in float16: finite={finite}"
        + (f", rel. error {err:.2e}" if finite else "")
    )


def random_vae():
    import torch
    from diffusers import AutoencoderKLQwenImage

    from qwen_mlx.convert import ConvertOptions, convert_checkpoint
    from qwen_mlx.models.vae import QwenImageVAE

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    AutoencoderKLQwenImage().save_pretrained(tmp / "src" / "vae")
    (tmp / "src" / "model_index.json").write_text(
        '{"vae": ["diffusers", "AutoencoderKLQwenImage"]}'
    )
    dst = convert_checkpoint(tmp / "src", tmp / "mlx", ConvertOptions(dtype="float32"))
    return QwenImageVAE.from_pretrained(dst / "vae")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="converted or diffusers-layout checkpoint")
    ap.add_argument("--random-vae", action="store_true", help="released VAE config, random init")
    ap.add_argument("--size", type=int, default=256, help="decoded image side")
    args = ap.parse_args()
    np.set_printoptions(precision=3)
    if args.random_vae:
        print("released VAE config with diffusers' random init (real weights behave differently)")
        measure_vae(random_vae(), args.size)
        return
    if args.model is None:
        ap.error("give --model or --random-vae")
    from qwen_mlx.pipelines.txt2img import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(args.model, dtype="float32")
    print(f"checkpoint {args.model}")
    measure_vae(pipe.vae, args.size)
    measure_text_encoder(pipe.text_encoder)


if __name__ == "__main__":
    main()
