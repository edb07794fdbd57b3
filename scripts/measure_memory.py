"""Measure the activation memory of one denoising step and of one VAE decode (random weights).

This is the evidence behind the activation terms of ``qwen_mlx.memory``: it runs the released
architecture (narrower transformer blocks, to stay cheap on a CPU) and prints the activation
peak (``mx.get_peak_memory()`` minus the weights) per token x hidden unit (transformer) and per
output pixel (VAE), next to what ``qwen_mlx.memory`` predicts for the same call.

    python scripts/measure_memory.py                   # defaults: 2 blocks of 8 heads, 256/128 px
    python scripts/measure_memory.py --heads 24 --size 512 --vae-size 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _openblas import blas_in_use, preload_openblas  # scripts/ is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def nbytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def measure(fn) -> int:
    import mlx.core as mx

    mx.eval(fn())  # warm up (compiled kernels, caches)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(fn())
    return mx.get_peak_memory() - base


def transformer(args) -> None:
    import mlx.core as mx

    from qwen_mlx import memory
    from qwen_mlx.models.transformer import QwenImageTransformer, TransformerConfig
    from qwen_mlx.precision import make_plan

    for plan_name in ("fp32", "bf16"):
        cfg = TransformerConfig(
            num_layers=args.layers, num_attention_heads=args.heads, joint_attention_dim=3584
        )
        model = QwenImageTransformer(cfg)
        model.apply_plan(make_plan(plan_name, None, args.layers))
        mx.eval(model.parameters())
        h = w = args.size // 16
        L, T, B = h * w, args.text, 2
        x = mx.random.normal((B, L, cfg.in_channels))
        txt = mx.random.normal((B, T, 3584))
        t = mx.full((B,), 0.5)
        shapes = [[(1, h, w)]] * B
        act = measure(lambda m=model, a=(x, txt, None, t, shapes): m(*a))
        unit = B * (L + T) * cfg.inner_dim
        predicted = memory.transformer_activations(
            cfg.inner_dim, cfg.num_attention_heads, B, L + T, plan_name
        )
        print(
            f"transformer {plan_name}: {args.size}px, B={B}, S={L + T}, inner={cfg.inner_dim}: "
            f"weights {nbytes(model) / 2**20:.0f} MiB, activations {act / 2**20:.1f} MiB = "
            f"{act / unit:.1f} bytes per token x unit (predicted {predicted / 2**20:.1f} MiB)"
        )
        del model
        mx.clear_cache()


def vae(args) -> None:
    import mlx.core as mx

    from qwen_mlx import memory
    from qwen_mlx.models.vae import QwenImageVAE, VAEConfig

    cfg = VAEConfig()  # the released VAE's configuration
    model = QwenImageVAE(cfg)
    mx.eval(model.parameters())
    s = args.vae_size // cfg.scale_factor
    z = mx.random.normal((1, s, s, cfg.z_dim))
    act = measure(lambda: model.decode(z, tile_size=None))
    pixels = args.vae_size**2
    predicted = memory.vae_activations(cfg.base_dim, args.vae_size, args.vae_size, 4, None)
    print(
        f"vae decode float32 {args.vae_size}px: weights {nbytes(model) / 2**20:.0f} MiB, "
        f"activations {act / 2**20:.1f} MiB = {act / pixels:.0f} bytes per pixel "
        f"({act / pixels / cfg.base_dim:.1f} per pixel x base_dim; predicted "
        f"{predicted / 2**20:.1f} MiB)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8, help="24 is the released model")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (transformer)")
    p.add_argument("--text", type=int, default=64, help="prompt tokens")
    p.add_argument("--vae-size", type=int, default=128, help="image side in pixels (VAE)")
    p.add_argument("--only", choices=["transformer", "vae"], help="measure one component")
    args = p.parse_args()
    preload_openblas()  # re-executes once with OpenBLAS on Linux CPU
    print(f"BLAS: {blas_in_use()}")
    import mlx.core as mx

    print(f"device: {mx.default_device()}")
    if args.only != "vae":
        transformer(args)
    if args.only != "transformer":
        vae(args)


if __name__ == "__main__":
    main()
