"""Precision plans side by side: error against float32 and time per transformer forward.

Every plan runs the same random weights (regenerated from one seed, so no float32 master copy
is held) on the same inputs and device. Error is max|out - out_fp32| / max|out_fp32| of the
velocity prediction. diffusers in bfloat16 on the same weights is timed as a reference.
Random weights lack the released model's huge activations, so plain float16 would not overflow
here; the overflow itself is tested in tests/test_precision.py.

    python scripts/bench_precision.py                       # CPU: 2 layers, full width, 128x128
    python scripts/bench_precision.py --device gpu --layers 60 --size 1024 --text 128

The float32 reference of the full 60-layer model needs ~82 GB (bf16/fp16 plans ~41 GB); use
fewer --layers on smaller machines. On Linux CPUs MLX has no fast half-precision matmuls and
torch's bf16 uses oneDNN, so CPU timings say little about Apple GPUs.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from _openblas import blas_in_use, preload_openblas  # scripts/ is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_mlx.convert.rules import rename  # noqa: E402
from qwen_mlx.device import auto_precision  # noqa: E402
from qwen_mlx.models.transformer import QwenImageTransformer, TransformerConfig  # noqa: E402
from qwen_mlx.precision import make_plan  # noqa: E402

# MLX name -> diffusers name (the inverse of convert/transformer.py's RULES).
TO_DIFFUSERS = (
    (r"^blocks\.", "transformer_blocks."),
    (r"_mod\.", "_mod.1."),
    (r"\.to_out\.", ".to_out.0."),
    (r"_mlp\.up\.", "_mlp.net.0.proj."),
    (r"_mlp\.down\.", "_mlp.net.2."),
    (r"^time_embed\.", "time_text_embed.timestep_embedder."),
)


def model_config(args) -> dict:
    return dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=args.layers,
        attention_head_dim=128, num_attention_heads=args.heads, joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip


def fresh_model(args) -> QwenImageTransformer:
    """The benchmark's float32 weights, lazily: nothing is computed until evaluated."""
    mx.random.seed(args.seed)
    return QwenImageTransformer(TransformerConfig.from_dict(model_config(args)))


def build(args, plan: str) -> QwenImageTransformer:
    model = fresh_model(args)
    model.apply_plan(make_plan(plan, args.variant, args.layers))
    for block in model.blocks:  # one block at a time: float32 temporaries stay small
        mx.eval(block.parameters())
    mx.eval(model.parameters())
    return model


def inputs(args) -> tuple[np.ndarray, np.ndarray, int]:
    side = args.size // 16
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((1, side * side, 64), dtype=np.float32)
    enc = rng.standard_normal((1, args.text, 3584), dtype=np.float32)
    return x, enc, side


def timed(step, args) -> tuple[float, object]:
    out = None
    for _ in range(args.warmup):
        out = step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run_plan(args, plan: str) -> dict:
    model = build(args, plan)
    x, enc, side = inputs(args)
    x, enc, t = mx.array(x), mx.array(enc), mx.array([0.5])
    mx.reset_peak_memory()

    def step():
        out = model(x, enc, None, t, [(1, side, side)])
        mx.eval(out)
        return out

    seconds, out = timed(step, args)
    result = {
        "weights": model.plan.storage_dtype(),
        "seconds": seconds,
        "peak": mx.get_peak_memory(),
        "out": np.array(out),
    }
    model = None  # free it before the next plan
    gc.collect()
    mx.clear_cache()
    return result


def run_diffusers(args) -> dict:
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from diffusers import QwenImageTransformer2DModel
    from mlx.utils import tree_flatten

    if args.device == "cpu":
        dev = "cpu"
    else:
        dev = "mps" if torch.backends.mps.is_available() else "cuda"
    dtype = torch.bfloat16
    with init_empty_weights():
        model = QwenImageTransformer2DModel(**model_config(args)).eval()
    names = set(model.state_dict())
    for name, v in tree_flatten(fresh_model(args).parameters()):  # same weights, one at a time
        name = rename(name, TO_DIFFUSERS)
        if name not in names:
            raise KeyError(f"no diffusers parameter {name}")
        value = torch.from_numpy(np.array(v)).to(dtype)
        set_module_tensor_to_device(model, name, dev, value=value, dtype=dtype)
    x, enc, side = inputs(args)
    x = torch.from_numpy(x).to(dev, dtype)
    enc = torch.from_numpy(enc).to(dev, dtype)
    t = torch.tensor([0.5], device=dev, dtype=dtype)
    sync = {"cuda": torch.cuda.synchronize, "mps": lambda: torch.mps.synchronize()}.get(
        dev, lambda: None
    )
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()

    @torch.inference_mode()
    def step():
        out = model(x, enc, None, t, [(1, side, side)]).sample
        sync()
        return out

    seconds, out = timed(step, args)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return {
        "weights": "bfloat16",
        "seconds": seconds,
        "peak": peak,
        "out": out.float().cpu().numpy(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=24, help="x128 = width (24: the real 3072)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--text", type=int, default=16, help="text tokens")
    ap.add_argument("--plans", default="fp32,bf16,fp16,mixed", help="comma list (fp32 first)")
    ap.add_argument("--variant", default="qwen-image", help="scale table for fp16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    args = ap.parse_args()
    preload_openblas()  # re-executes once with OpenBLAS on Linux CPU
    print(f"BLAS: {blas_in_use()}")

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    if "fp32" not in plans:
        plans.insert(0, "fp32")
    plans.sort(key=lambda p: p != "fp32")  # the reference runs first
    tokens = (args.size // 16) ** 2
    print(
        f"transformer forward: {args.layers} layers, width {args.heads * 128}, "
        f"{args.size}x{args.size} ({tokens} image tokens) + {args.text} text tokens, "
        f"device={args.device} ({mx.default_device()}), mlx {mx.__version__}"
    )
    print(f"auto precision here: {auto_precision()[0]} ({auto_precision()[1]})")

    results = {}
    for plan in plans:
        results[plan] = run_plan(args, plan)
        print(f"  ran {plan}", file=sys.stderr, flush=True)
    if args.diffusers:
        try:
            results["diffusers bf16"] = run_diffusers(args)
        except Exception as e:  # noqa: BLE001 - a reference timing is optional
            print(f"diffusers bf16 skipped: {type(e).__name__}: {e}")

    ref = results["fp32"]
    scale = max(float(np.abs(ref["out"]).max()), 1e-12)
    print(f"{'plan':15s} {'weights':9s} {'rel. error':>10s} {'s/forward':>10s} "
          f"{'vs fp32':>8s} {'peak GiB':>9s}")  # fmt: skip
    for name, r in results.items():
        out = r["out"]
        err = float(np.abs(out - ref["out"]).max()) / scale
        err_text = f"{err:10.2e}" if np.isfinite(out).all() else f"{'non-finite':>10s}"
        peak = f"{r['peak'] / 2**30:9.3f}" if r["peak"] is not None else f"{'n/a':>9s}"
        print(
            f"{name:15s} {r['weights']:9s} {err_text} {r['seconds']:10.3f} "
            f"{r['seconds'] / ref['seconds']:7.2f}x {peak}"
        )
    print(
        "(MLX peak: allocations during the timed forwards, weights included; "
        "torch CPU peak is not tracked)"
    )


if __name__ == "__main__":
    main()
