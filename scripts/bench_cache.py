"""Step caches: full passes per image and time against the uncached loop, in one run.

A true-CFG Euler loop (cond and uncond batched, as the pipeline runs it) over a random model,
once uncached and once per cache setting: First-Block Cache at three thresholds, TaylorSeer
(attention, diffusers' default) at two intervals and its lite mode, MagCache at two thresholds
and a longer skip run, from ratios calibrated in the same run. Two models: the tests' tiny one
and a full-width (3072, 24 heads x 128) two-block one (one setting per method, as a CPU pass
takes seconds). Weights are random, with the time embedding's high-frequency inputs zeroed so
that the modulation varies smoothly with sigma, as a trained model's does; the skip pattern on
a real checkpoint differs (see docs/speed.md).
"drift" is max |x - x_uncached| / max |x_uncached| of the final latents.

    python scripts/bench_cache.py                 # both models, CPU, a few minutes
    python scripts/bench_cache.py --model tiny --steps 50
"""

from __future__ import annotations

import argparse
import time

from _openblas import blas_in_use, preload_openblas  # scripts/ is on sys.path

MODELS = {
    "tiny": dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    ),
    "full-width-2": dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
    ),
}  # fmt: skip


def build(name: str):
    import mlx.core as mx

    from qwen_mlx.models.transformer import QwenImageTransformer, TransformerConfig

    mx.random.seed(0)
    model = QwenImageTransformer(TransformerConfig.from_dict(MODELS[name]))
    w = model.time_embed.linear_1.weight  # (dim, 256): cos | sin, highest frequency first
    keep = (mx.arange(256) % 128) >= 100
    model.time_embed.linear_1.weight = w * keep[None].astype(w.dtype)
    mx.eval(model.parameters())
    return model


def settings(few: bool) -> list[tuple[str, object]]:
    from qwen_mlx.step_cache import FirstBlockCacheConfig as FBC
    from qwen_mlx.step_cache import MagCacheConfig as Mag
    from qwen_mlx.step_cache import TaylorSeerCacheConfig as TS

    if few:  # one setting per method: diffusers' defaults
        return [("fbcache 0.05", FBC()), ("taylorseer 5", TS()), ("magcache 0.06", Mag())]
    return [
        ("fbcache 0.05", FBC(0.05)),
        ("fbcache 0.1", FBC(0.1)),
        ("fbcache 0.2", FBC(0.2)),
        ("taylorseer 3", TS(cache_interval=3)),
        ("taylorseer 5", TS(cache_interval=5)),
        ("taylorseer-lite 5", TS(cache_interval=5, use_lite_mode=True)),
        ("magcache 0.06", Mag(threshold=0.06)),
        ("magcache 0.24", Mag(threshold=0.24)),
        ("magcache 0.24 K=6", Mag(threshold=0.24, max_skip_steps=6)),
    ]


def bench(name: str, steps: int, size: int, text: int, few: bool) -> None:
    import mlx.core as mx
    import numpy as np

    from qwen_mlx.step_cache import MagCacheConfig, StepCacheRun

    model = build(name)
    cfg = model.config
    h = w = size // 16
    mx.random.seed(1)
    x0 = mx.random.normal((1, h * w, cfg.in_channels))
    enc = mx.random.normal((2, text, cfg.joint_attention_dim))
    shapes = [[(1, h, w)]] * 2
    sigmas = np.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    mods = [model.modulation(mx.array([s])) for s in sigmas[:-1]]
    mx.eval([m.arrays() for m in mods])

    def loop(run) -> tuple[mx.array, float]:
        x = x0
        start = time.perf_counter()
        for i in range(steps):
            xx = mx.concatenate([x, x])
            call = model if run is None else (lambda *a, **k: run(model, *a, **k))
            out = call(xx, enc, None, None, shapes, modulation=mods[i])
            v = out[1:] + 4.0 * (out[:1] - out[1:])
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            mx.eval(x)
        return x, time.perf_counter() - start

    if not few:
        loop(None)  # warm-up (a full-width pass takes seconds: its first one barely differs)
    mx.reset_peak_memory()
    base, t_base = loop(None)
    base_np = np.array(base)
    calib = StepCacheRun(MagCacheConfig(calibrate=True), steps, branches=2)
    loop(calib)
    print(f"\n{name}: {size}x{size}, {text} text tokens, {steps} steps, true CFG")
    print(f"{'cache':<20}{'full passes':>13}{'time s':>9}{'speed-up':>10}{'drift':>10}")
    print(f"{'none':<20}{f'{2 * steps}/{2 * steps}':>13}{t_base:>9.3f}{1.0:>10.2f}{0.0:>10.1e}")
    for label, config in settings(few):
        ratios = calib.calibrated if isinstance(config, MagCacheConfig) else None
        run = StepCacheRun(config, steps, branches=2, mag_ratios=ratios)
        x, t = loop(run)
        drift = np.abs(np.array(x) - base_np).max() / np.abs(base_np).max()
        passes = f"{run.total_full_passes}/{run.passes}"
        print(f"{label:<20}{passes:>13}{t:>9.3f}{t_base / t:>10.2f}{drift:>10.1e}")
    print(f"peak memory {mx.get_peak_memory() / 2**20:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=[*MODELS, "all"], default="all")
    ap.add_argument("--steps", type=int, default=None, help="default: 30 tiny, 8 full-width")
    ap.add_argument("--size", type=int, default=None, help="default: 64 tiny, 32 full-width")
    ap.add_argument("--text", type=int, default=None, help="text tokens; default 16 tiny, 8 full")
    ap.add_argument(
        "--all-settings", action="store_true", help="every setting on the full-width model too"
    )
    args = ap.parse_args()
    preload_openblas()  # re-executes once with OpenBLAS on Linux CPU
    print(f"BLAS: {blas_in_use()}")
    for name in MODELS if args.model == "all" else [args.model]:
        full = name != "tiny"
        steps = args.steps or (8 if full else 30)
        size, text = args.size or (32 if full else 64), args.text or (8 if full else 16)
        bench(name, steps, size, text, few=full and not args.all_settings)


if __name__ == "__main__":
    main()
