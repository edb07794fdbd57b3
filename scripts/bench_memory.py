"""Peak memory of a 1024x1024 generation of the full-size model: transformer bf16 / 8-bit /
4-bit, each with and without the adaLN cache; text encoder bf16 / 8-bit / 4-bit; plus the
quantization error of one full-width block and of the whole (tiny) pipeline, and the time of a
block forward. Prints one table.

Random weights, built one block (one layer) at a time so the script fits a 24 GB machine:

* weights: every transformer format is built block by block at full width (3072, 60 blocks):
  the first and a middle block are built in each format and measured (``mx.get_active_memory``),
  the total extrapolated (2 edge + 58 middle blocks + the outer layers); with ``--full-build``
  the 4-bit + adaLN-cache transformer (the 16 GB-Mac configuration) is also built whole, 60
  blocks, and measured as it stands. The language model likewise (one layer x 28 + embeddings).
* activations (``mx.get_peak_memory`` over what was resident): one full-width block forward at
  the image's token count with the CFG-doubled batch, one language-model layer over the prompt
  batch, the VAE decode. Measured in float32 compute (CPU bf16 and quantized matmuls are very
  slow here); bf16/quantized runs keep linear outputs half as wide, so these are upper bounds.
  MLX's CPU attention materialises the scores (rows x heads x tokens^2); Metal's fused
  ``scaled_dot_product_attention`` does not: the block is measured at two sizes to split the
  activations into a per-token and a per-token^2 part, and the table gives both peaks.
* a stage's peak = its resident weights + its largest activation peak (blocks run one after
  another; the adaLN table is read one step at a time, ~4 MB).

    python scripts/bench_memory.py                 # CPU: ~20 min on 2 shared cores
    python scripts/bench_memory.py --full-build    # + the whole 4-bit transformer (+6 min)
    python scripts/bench_memory.py --size 256 --text-layers 2   # a quick look (~5 min)
    # on a Mac / GPU the same command measures there (fused attention: see the "fused" column)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _openblas import blas_in_use, preload_openblas  # scripts/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

GiB = 2**30


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--prompt-tokens", type=int, default=128, help="longest prompt (tokens)")
    p.add_argument("--text-layers", type=int, default=28, help="layers for the embedding error")
    p.add_argument("--full-build", action="store_true", help="build the whole 4-bit model")
    p.add_argument("--skip-errors", action="store_true")
    return p.parse_args()


def main() -> None:
    args = parse()
    preload_openblas()
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten

    from qwen_mlx.memory import LEAN_DECODE_TILE
    from qwen_mlx.models.text_encoder import DecoderLayer, TextEncoderConfig, mrope_cos_sin
    from qwen_mlx.models.transformer import (
        MODULATION_WEIGHTS,
        QwenImageTransformer,
        TransformerBlock,
        TransformerConfig,
        rope_tables,
    )
    from qwen_mlx.models.vae import QwenImageVAE, VAEConfig
    from qwen_mlx.quantize import (
        quantize_model,
        quantize_weights,
        text_encoder_plan,
        transformer_plan,
    )

    print(f"BLAS: {blas_in_use()}; device: {mx.default_device()}", flush=True)
    fused = mx.default_device() == mx.gpu
    cfg = TransformerConfig()
    L = cfg.num_layers
    rows, T = 2, args.prompt_tokens  # true CFG: cond + uncond
    n_img = (args.size // 16) ** 2
    notes: list[str] = []

    def nbytes(module: nn.Module) -> int:
        return sum(v.nbytes for _, v in tree_flatten(module.parameters()))

    def settle() -> None:
        mx.clear_cache()
        mx.reset_peak_memory()

    # ------------------------------------------------------------------ transformer weights
    def build_block(index: int, fmt: str, modulation: bool, seed: int = 0) -> TransformerBlock:
        """One full-width block, random (nn.Linear init), bf16, optionally quantized."""
        mx.random.seed(seed + index)
        block = TransformerBlock(cfg)
        if not modulation:
            block.pop("img_mod")
            block.pop("txt_mod")
        w = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(block.parameters())}
        if fmt != "bf16":
            plan = transformer_plan(int(fmt))
            w = quantize_weights(
                w, lambda p, s: plan.bits_for(f"blocks.{index}.{p}", s, L), plan.group_size
            )
            quantize_model(block, w, plan.group_size)
        block.load_weights(list(w.items()), strict=True)
        mx.eval(block.parameters())
        return block

    start = time.perf_counter()
    outer = QwenImageTransformer(TransformerConfig(num_layers=1))
    outer.blocks = []
    outer_w = {k: v for k, v in tree_flatten(outer.parameters())}
    outer_bytes = sum(v.size * 2 for v in outer_w.values())
    outer_mod = sum(v.size * 2 for k, v in outer_w.items() if MODULATION_WEIGHTS.match(k))
    del outer, outer_w
    weights: dict[tuple[str, bool], int] = {}
    for fmt in ("bf16", "8", "4"):
        for modulation in (True, False):
            edge = build_block(0, fmt, modulation)
            middle = build_block(L // 2, fmt, modulation)
            total = 2 * nbytes(edge) + (L - 2) * nbytes(middle)
            total += outer_bytes - (0 if modulation else outer_mod)
            weights[fmt, not modulation] = total
            del edge, middle
    settle()
    notes.append(
        f"transformer weights: first + middle block built per format, x60 extrapolated "
        f"({time.perf_counter() - start:.0f} s)"
    )

    full_4bit = None
    if args.full_build:
        start = time.perf_counter()
        settle()
        base = mx.get_active_memory()
        blocks = []
        for i in range(L):
            blocks.append(build_block(i, "4", modulation=False))
            mx.clear_cache()
        full_4bit = mx.get_active_memory() - base + outer_bytes - outer_mod
        built_peak = mx.get_peak_memory() - base
        del blocks
        settle()
        notes.append(
            f"4-bit + adaLN cache transformer built whole: {full_4bit / GiB:.2f} GiB resident "
            f"(extrapolated {weights['4', True] / GiB:.2f}), build peak "
            f"{built_peak / GiB:.2f} GiB ({time.perf_counter() - start:.0f} s)"
        )

    # ------------------------------------------------------------------ denoise activations
    def block_activation(n_image: int) -> tuple[int, float]:
        """Peak bytes over resident weights of one float32 block forward, and its time."""
        mx.random.seed(1)
        block = TransformerBlock(cfg)
        mx.eval(block.parameters())
        side = int(round(n_image**0.5))
        rope = rope_tables(((1, side, n_image // side),), T, cfg.axes_dims_rope, cfg.rope_theta)
        mx.eval(rope)
        temb = nn.silu(mx.random.normal((1, cfg.inner_dim)))
        mod = block.modulation(temb)
        mx.eval(mod)
        settle()
        base = mx.get_active_memory()
        img = mx.random.normal((rows, n_image, cfg.inner_dim))
        txt = mx.random.normal((rows, T, cfg.inner_dim))
        mx.eval(img, txt)
        t0 = time.perf_counter()
        out = block(img, txt, mod, None, rope)
        mx.eval(out)
        seconds = time.perf_counter() - t0
        peak = mx.get_peak_memory() - base
        del block, out, img, txt
        settle()
        return peak, seconds

    start = time.perf_counter()
    small = max(n_img // 4, 16)  # a second size splits per-token from per-token^2
    act_small, _ = block_activation(small)
    act_full, block_s = block_activation(n_img)
    # act(N) = a N + b N^2 with N = image + text tokens: b is the attention-score part
    n1, n2 = small + T, n_img + T
    b = (act_full / n2 - act_small / n1) / (n2 - n1)
    a = act_full / n2 - b * n2
    act_fused = int(a * n2)
    act_here = act_full
    per_token_dim = a / (rows * cfg.inner_dim)
    notes.append(
        f"denoise block (float32, {rows} rows x {n_img}+{T} tokens): activations "
        f"{act_full / GiB:.2f} GiB here, {act_fused / GiB:.2f} GiB without the score buffer "
        f"({per_token_dim:.1f} bytes per row*token*width; scores {b / rows:.1f} bytes per "
        f"row*token^2 ~ {cfg.num_attention_heads} heads x {b / rows / cfg.num_attention_heads:.1f}"
        f"); {block_s:.1f} s per block here -> {block_s * L:.0f} s per forward "
        f"({time.perf_counter() - start:.0f} s)"
    )

    # ------------------------------------------------------------------ text encoder
    te_cfg = TextEncoderConfig()
    start = time.perf_counter()

    def build_layer(bits: int | None, seed: int = 0) -> DecoderLayer:
        mx.random.seed(seed)
        layer = DecoderLayer(te_cfg)
        w = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(layer.parameters())}
        if bits:
            plan = text_encoder_plan(bits)
            w = quantize_weights(
                w, lambda p, s: plan.bits_for(f"language_model.layers.0.{p}", s), 64
            )
            quantize_model(layer, w, 64)
        layer.load_weights(list(w.items()), strict=True)
        mx.eval(layer.parameters())
        return layer

    vocab, hidden = te_cfg.vocab_size, te_cfg.hidden_size
    te_weights = {}
    for bits in (None, 8, 4):
        layer = build_layer(bits)
        embed = vocab * hidden * (2 if not bits else bits / 8 + 4 / 64)
        te_weights[bits] = int(te_cfg.num_hidden_layers * nbytes(layer) + embed + hidden * 2)
        del layer
    settle()
    layer = build_layer(None)
    layer.load_weights([(k, v.astype(mx.float32)) for k, v in tree_flatten(layer.parameters())])
    mx.eval(layer.parameters())
    tt = T + 34
    pos = mx.broadcast_to(mx.arange(tt)[None, None], (3, rows, tt))
    settle()
    base = mx.get_active_memory()
    h = mx.random.normal((rows, tt, hidden)) * 0.02
    cos, sin = mrope_cos_sin(pos, te_cfg.head_dim, te_cfg.rope_theta, te_cfg.mrope_section, h.dtype)
    out = layer(h, cos, sin, "causal")
    mx.eval(out)
    te_act = mx.get_peak_memory() - base + rows * tt * hidden * 4  # + the final hidden states
    del layer, out, h
    settle()
    notes.append(
        f"text encoder: one layer x {te_cfg.num_hidden_layers} + embeddings; activations of "
        f"one float32 layer over {rows} x {tt} tokens ({time.perf_counter() - start:.0f} s)"
    )

    # ------------------------------------------------------------------ VAE
    start = time.perf_counter()
    vae_cfg = VAEConfig.from_dict(
        dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
             temperal_downsample=[False, True, True], attn_scales=[])
    )  # fmt: skip
    vae = QwenImageVAE(vae_cfg)
    mx.eval(vae.parameters())
    vae_bytes = sum(v.size * 2 for _, v in tree_flatten(vae.parameters()))  # bf16

    def decode_peak(vae: QwenImageVAE, side: int, tile: int | None) -> int:
        settle()
        base = mx.get_active_memory()
        z = mx.random.normal((1, side // 8, side // 8, 16))
        mx.eval(vae.decode(z, tile_size=tile))
        return mx.get_peak_memory() - base

    # untiled: per pixel (scaled to the size, as the default tile (1024x1024) allows)
    decode_side = min(args.size, 512)
    decode_act = decode_peak(vae, decode_side, None) * min(args.size, 1024) ** 2 / decode_side**2
    # tiles of LEAN_DECODE_TILE latent pixels (what quantized pipelines use): bounded
    lean_side = min(args.size, 768)
    lean_act = decode_peak(vae, lean_side, LEAN_DECODE_TILE)
    del vae
    settle()
    notes.append(
        f"VAE (float32 here): untiled decode measured at {decode_side}x{decode_side} and scaled "
        f"per pixel to {min(args.size, 1024)}x{min(args.size, 1024)}; tiled decode ("
        f"{LEAN_DECODE_TILE} latent px tiles) measured at {lean_side}x{lean_side} (one tile's "
        f"activations: the same at any size) ({time.perf_counter() - start:.0f} s)"
    )

    # ------------------------------------------------------------------ errors
    errors: dict[str, str] = {}
    if not args.skip_errors:
        start = time.perf_counter()
        errors.update(block_errors(cfg, mx, nn, tree_flatten, quantize_weights, rope_tables))
        errors.update(text_errors(args.text_layers, mx, tree_flatten, quantize_weights))
        errors.update(pipeline_errors())
        notes.append(f"errors ({time.perf_counter() - start:.0f} s)")

    # ------------------------------------------------------------------ the table
    def gib(x: float) -> str:
        return f"{x / GiB:6.2f}"

    print()
    print(f"Peak memory at {args.size}x{args.size}, true CFG, prompt {T} tokens (GiB)")
    print(
        "stage peaks = resident weights + that stage's largest activations; 'fused' = attention "
        "scores not materialised (Metal), 'here' = as measured on this device; decode keeps "
        "the transformer resident (low-memory: freed first); quantized runs decode in tiles"
    )
    head = (
        "transformer  adaLN  text enc. | TE stage | denoise here | denoise fused | decode | "
        "decode low-mem | peak fused | peak fused low-mem | peak here"
    )
    print(head)
    print("-" * len(head))
    configs = [
        ("bf16", False, None),
        ("bf16", True, None),
        ("8", False, 8),
        ("8", True, 8),
        ("4", False, 8),
        ("4", True, 8),
        ("4", True, None),
        ("4", True, 4),
    ]
    for fmt, cache, te in configs:
        w = weights[fmt, cache]
        if fmt == "4" and cache and full_4bit is not None:
            w = full_4bit
        dec_act = decode_act if fmt == "bf16" else lean_act
        te_stage = te_weights[te] + te_act
        here, fused_ = w + act_here, w + act_fused
        decode, decode_low = w + vae_bytes + dec_act, vae_bytes + dec_act
        name = {"bf16": "bf16", "8": "8-bit", "4": "4-bit"}[fmt]
        te_name = "bf16" if te is None else f"{te}-bit"
        print(
            f"{name:11s}  {'on' if cache else 'off':5s}  {te_name:9s} | {gib(te_stage):>8s} | "
            f"{gib(here):>12s} | {gib(fused_):>13s} | {gib(decode):>6s} | {gib(decode_low):>14s} | "
            f"{gib(max(te_stage, fused_, decode)):>10s} | "
            f"{gib(max(te_stage, fused_, decode_low)):>18s} | "
            f"{gib(max(te_stage, here, decode)):>9s}"
        )
    print()
    print(
        f"weights (GiB): transformer bf16 {gib(weights['bf16', False])}, "
        f"+cache {gib(weights['bf16', True])}; 8-bit {gib(weights['8', False])}, +cache "
        f"{gib(weights['8', True])}; 4-bit {gib(weights['4', False])}, +cache "
        f"{gib(weights['4', True])}; text encoder bf16 {gib(te_weights[None])}, 8-bit "
        f"{gib(te_weights[8])}, 4-bit {gib(te_weights[4])}; VAE {gib(vae_bytes)}"
    )
    print(
        f"activations (GiB): denoise block {gib(act_here)} here / {gib(act_fused)} fused; "
        f"text layer {gib(te_act)}; decode untiled {gib(decode_act)}, tiled {gib(lean_act)}"
    )
    if errors:
        print("quantization error (relative RMS unless noted):")
        for k, v in errors.items():
            print(f"  {k}: {v}")
    print(f"attention on this device: {'fused' if fused else 'scores materialised'}")
    for n in notes:
        print(f"note: {n}")
    print(
        "GPU (when lent): the same command on the device; time per forward there with "
        "python scripts/bench_transformer.py --device gpu --layers 60 --size 1024 --dtype bfloat16"
    )
    _ = np


def dequantized(weights, mx):
    """Float32 weights equal to what the quantized layers compute with (CPU quantized matmuls
    are slow here; the dequantized float32 matmul is the same function up to rounding)."""
    out = {}
    for k, v in weights.items():
        if k.endswith((".scales", ".biases")):
            continue
        p = k.rpartition(".")[0]
        if k.endswith(".weight") and f"{p}.scales" in weights:
            s = weights[f"{p}.scales"]
            bits = v.shape[-1] * 32 // (s.shape[-1] * 64)
            b = weights[f"{p}.biases"]
            out[k] = mx.dequantize(v, s.astype(mx.float32), b.astype(mx.float32), 64, bits)
        else:
            out[k] = v.astype(mx.float32)
    return out


def rel_rms(a, b, base, mx) -> float:
    return float(mx.sqrt(mx.mean((a - b) ** 2)) / mx.sqrt(mx.mean((b - base) ** 2)))


def block_errors(cfg, mx, nn, tree_flatten, quantize_weights, rope_tables) -> dict[str, str]:
    """One full-width block (the 4-bit plan's middle block: 4-bit linears, 8-bit modulation)."""
    from qwen_mlx.models.transformer import TransformerBlock
    from qwen_mlx.quantize import transformer_plan

    mx.random.seed(0)
    block = TransformerBlock(cfg)
    w = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(block.parameters())}
    block.load_weights([(k, v.astype(mx.float32)) for k, v in w.items()])
    T, side = 64, 16
    img = mx.random.normal((1, side * side, cfg.inner_dim))
    txt = mx.random.normal((1, T, cfg.inner_dim))
    temb = nn.silu(mx.random.normal((1, cfg.inner_dim)))
    rope = rope_tables(((1, side, side),), T, cfg.axes_dims_rope, cfg.rope_theta)

    def run(b):
        mod = b.modulation(temb)
        return b(img, txt, mod, None, rope), mod

    (ri, rt), rmod = run(block)
    mx.eval(ri, rt, rmod)
    out = {}
    variants = {
        "8-bit": lambda p, s: transformer_plan(8).bits_for(f"blocks.30.{p}", s, 60),
        "4-bit plan (8-bit modulation)": lambda p, s: transformer_plan(4).bits_for(
            f"blocks.30.{p}", s, 60
        ),
        "all 4-bit (for comparison)": lambda p, s: 4 if len(s) == 2 else None,
    }
    for name, bits_for in variants.items():
        q = TransformerBlock(cfg)
        q.load_weights(list(dequantized(quantize_weights(w, bits_for, 64), mx).items()))
        (qi, qt), qmod = run(q)
        mx.eval(qi, qt, qmod)
        mod_err = float(mx.sqrt(mx.mean((qmod[0] - rmod[0]) ** 2)) / mx.sqrt(mx.mean(rmod[0] ** 2)))
        out[f"full-width block, {name}"] = (
            f"image-stream update {rel_rms(qi, ri, img, mx):.2%}, text-stream update "
            f"{rel_rms(qt, rt, txt, mx):.2%}, modulation {mod_err:.2%} (vs bf16 weights)"
        )
    return out


def text_errors(layers: int, mx, tree_flatten, quantize_weights) -> dict[str, str]:
    """Hidden states after ``layers`` full-width language-model layers, streamed layer by layer
    (random weights), 8-bit and 4-bit against the same bf16 weights."""
    from qwen_mlx.models.text_encoder import DecoderLayer, TextEncoderConfig, mrope_cos_sin
    from qwen_mlx.quantize import text_encoder_plan

    cfg = TextEncoderConfig()
    T = 32
    mx.random.seed(0)
    x0 = mx.random.normal((1, T, cfg.hidden_size)) * 0.02
    pos = mx.broadcast_to(mx.arange(T)[None, None], (3, 1, T))
    cos, sin = mrope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, mx.float32)
    hs = {"bf16": x0, 8: x0, 4: x0}
    for i in range(layers):
        mx.random.seed(100 + i)
        layer = DecoderLayer(cfg)
        w = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(layer.parameters())}
        for name in hs:
            if name == "bf16":
                lw = {k: v.astype(mx.float32) for k, v in w.items()}
            else:
                plan = text_encoder_plan(name)
                q = quantize_weights(
                    w, lambda p, s, plan=plan: plan.bits_for(f"language_model.{p}", s), 64
                )
                lw = dequantized(q, mx)
            layer.load_weights(list(lw.items()))
            hs[name] = layer(hs[name], cos, sin, "causal")
            mx.eval(hs[name])
    ref = hs["bf16"]
    out = {}
    for bits in (8, 4):
        err = float(mx.sqrt(mx.mean((hs[bits] - ref) ** 2)) / mx.sqrt(mx.mean(ref**2)))
        out[f"text encoder hidden states after {layers} layers, {bits}-bit"] = f"{err:.2%}"
    return out


def pipeline_errors() -> dict[str, str]:
    """The whole tiny pipeline (3 blocks 64 wide, true CFG, 3 steps): image max |diff|."""
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    import test_pipeline_quant as t

    from qwen_mlx.pipelines.txt2img import QwenImagePipeline

    class Factory:
        def mktemp(self, name):
            return Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))

    ckpt = t.ckpt.__wrapped__(Factory())
    base = t.image(QwenImagePipeline.from_pretrained(ckpt["f32"]))
    out = {}
    for bits in (8, 4):
        got = t.image(QwenImagePipeline.from_pretrained(ckpt[bits]))
        out[f"tiny pipeline image, {bits}-bit (bf16 storage) vs float32"] = (
            f"max |diff| {np.abs(got - base).max():.4f}, mean {np.abs(got - base).mean():.4f} "
            f"(image in [0, 1], std {base.std():.3f})"
        )
    return out


if __name__ == "__main__":
    main()
