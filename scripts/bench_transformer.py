"""Time our transformer forward against diffusers' on the same device, in one run.

Each side runs in its own subprocess so peak memory is its own. CPU default: full width
(3072, 24 heads x 128) at reduced depth; on a GPU (--device gpu) the full 60-layer model in
bf16 at 1024x1024 with 128 text tokens. Weights are random; parity is the tests' job.

    python scripts/bench_transformer.py                       # CPU, 2 layers, 256x256
    python scripts/bench_transformer.py --no-compile          # only the uncompiled forward

Without --compile/--no-compile both our variants run (blocks through mx.compile and not), and
the script checks that they agree.
    python scripts/bench_transformer.py --device gpu --layers 60 --size 1024 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from _openblas import blas_in_use, preload_openblas  # scripts/ is on sys.path


def full_config(layers: int) -> dict:
    return dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=layers,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip


def run_ours(args) -> dict:
    import mlx.core as mx

    from qwen_mlx.models.transformer import QwenImageTransformer, TransformerConfig
    from qwen_mlx.precision import PrecisionPlan

    if args.device == "gpu":
        mx.set_default_device(mx.gpu)
    mx.random.seed(0)  # the same weights and inputs for the compiled and uncompiled runs
    cfg = TransformerConfig.from_dict(full_config(args.layers))
    model = QwenImageTransformer(cfg)
    model.apply_plan(PrecisionPlan.uniform(args.dtype, cfg.num_layers))
    model.compile(args.side == "ours-compiled")
    mx.eval(model.parameters())
    h = w = args.size // 16
    x = mx.random.normal((1, h * w, 64)).astype(getattr(mx, args.dtype))
    enc = mx.random.normal((1, args.text, 3584)).astype(getattr(mx, args.dtype))
    t = mx.array([0.5])
    mx.reset_peak_memory()

    def step():
        out = model(x, enc, None, t, [(1, h, w)])
        mx.eval(out)
        return out

    result = timed(step, args.repeats, peak=lambda: mx.get_peak_memory())
    out = step().astype(mx.float32)
    result["checksum"] = [float(out.abs().sum()), float(out[0, :4, 0].sum())]
    return result


def run_ref(args) -> dict:
    import torch
    from diffusers import QwenImageTransformer2DModel

    dev = "cuda" if args.device == "gpu" else "cpu"
    dtype = getattr(torch, args.dtype)
    with torch.device(dev):
        model = QwenImageTransformer2DModel(**full_config(args.layers)).to(dtype).eval()
    h = w = args.size // 16
    x = torch.randn(1, h * w, 64, device=dev, dtype=dtype)
    enc = torch.randn(1, args.text, 3584, device=dev, dtype=dtype)
    t = torch.tensor([0.5], device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()

    @torch.inference_mode()
    def step():
        model(x, enc, None, t, [(1, h, w)])
        sync()

    peak = (
        torch.cuda.max_memory_allocated
        if dev == "cuda"
        else lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return timed(step, args.repeats, peak=peak)


def timed(step, repeats: int, peak) -> dict:
    step()  # warm-up (compilation, allocation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_bytes": peak()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--text", type=int, default=128, help="text tokens")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="only the compiled (--compile) or uncompiled (--no-compile) forward; default both",
    )
    ap.add_argument("--side", choices=["ours", "ours-compiled", "ref"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    preload_openblas()  # re-executes once with OpenBLAS on Linux CPU
    print(f"BLAS: {blas_in_use()}")

    if args.side:
        print(json.dumps(run_ref(args) if args.side == "ref" else run_ours(args)))
        return

    sides = ["ref"]
    if args.compile is not True:
        sides.append("ours")
    if args.compile is not False:
        sides.append("ours-compiled")
    results = {}
    for side in sides:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    ref = results["ref"]
    tokens = (args.size // 16) ** 2
    print(
        f"transformer forward, {args.layers} layers, {args.size}x{args.size} ({tokens} image "
        f"tokens) + {args.text} text tokens, {args.dtype}, device={args.device}"
    )
    names = {"ref": "diffusers", "ours": "qwen-mlx", "ours-compiled": "qwen-mlx compiled"}
    for side, r in results.items():
        print(
            f"  {names[side]:18s} median {r['median_s']:.4f} s  min {r['min_s']:.4f} s  "
            f"peak {r['peak_bytes'] / 2**30:.2f} GiB"
        )
    for side in sides[1:]:
        ratio = results[side]["median_s"] / ref["median_s"]
        print(f"  ratio {names[side]} / diffusers (median): {ratio:.2f}x")
    if len(sides) == 3:
        a, b = results["ours"]["checksum"], results["ours-compiled"]["checksum"]
        agree = all(abs(x - y) <= 1e-4 * max(abs(x), 1.0) for x, y in zip(a, b, strict=True))
        print(f"  compiled vs uncompiled output checksums agree: {agree} ({a} vs {b})")
    if args.device == "cpu":
        print("  (CPU peak for diffusers is process max RSS; for qwen-mlx MLX's peak allocation)")


if __name__ == "__main__":
    main()
