"""What a ControlNet adds to one denoising step: ours against diffusers', in one run.

A step with a ControlNet is the ControlNet's forward (its residuals) plus the transformer's
forward taking them; without, the transformer's alone. Each of the four cases (diffusers and
qwen-mlx, with and without) runs in its own subprocess so its peak memory is its own; the added
cost per step is (with - without), and the ratio compares ours with diffusers'. Weights are
random; parity is the tests' job.

CPU default: full width (3072, 24 heads x 128) at reduced depth (transformer 2 layers,
ControlNet 1 layer), 256x256, float32; --heads narrows it for a slow CPU. On a GPU, the real
shapes (60 + 5 layers, 1024x1024):

    python scripts/bench_controlnet.py
    python scripts/bench_controlnet.py --heads 4 --size 128 --text 32   # a loaded 2-core box
    python scripts/bench_controlnet.py --device gpu --layers 60 --cn-layers 5 --size 1024 \
        --dtype bfloat16
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

HEADS = 24  # set from --heads


def config(layers: int, controlnet: bool = False) -> dict:
    cfg = dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=layers,
        attention_head_dim=128, num_attention_heads=HEADS, joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip
    if controlnet:
        cfg["extra_condition_channels"] = 0
    return cfg


def timed(step, repeats: int, peak) -> dict:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_bytes": peak()}


def run_ours(args, with_cn: bool) -> dict:
    import mlx.core as mx

    from qwen_mlx.models.controlnet import ControlNetConfig, QwenImageControlNet
    from qwen_mlx.models.transformer import QwenImageTransformer, TransformerConfig
    from qwen_mlx.precision import make_plan

    if args.device == "gpu":
        mx.set_default_device(mx.gpu)
    mx.random.seed(0)
    model = QwenImageTransformer(TransformerConfig.from_dict(config(args.layers)))
    model.apply_plan(make_plan(args.dtype, None, args.layers))
    mx.eval(model.parameters())
    cn = None
    weight_bytes = 0
    if with_cn:
        cn = QwenImageControlNet(ControlNetConfig.from_dict(config(args.cn_layers, True)))
        cn.apply_plan(make_plan(args.dtype, None, args.cn_layers))
        mx.eval(cn.parameters())
        weight_bytes = sum(v.nbytes for _, v in _flat(cn.parameters()))
    h = w = args.size // 16
    dtype = mx.float32
    x = mx.random.normal((1, h * w, 64)).astype(dtype)
    cond = mx.random.normal((1, h * w, 64)).astype(dtype)
    enc = mx.random.normal((1, args.text, 3584)).astype(dtype)
    t = mx.array([0.5])
    mx.reset_peak_memory()

    def step():
        res = cn(x, cond, 1.0, enc, None, t, [(1, h, w)]) if cn is not None else None
        out = model(x, enc, None, t, [(1, h, w)], controlnet_block_samples=res)
        mx.eval(out)

    result = timed(step, args.repeats, peak=mx.get_peak_memory)
    result["weight_bytes"] = weight_bytes
    return result


def _flat(params):
    from mlx.utils import tree_flatten

    return tree_flatten(params)


def run_ref(args, with_cn: bool) -> dict:
    import torch
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    dev = "cuda" if args.device == "gpu" else "cpu"
    dtype = getattr(torch, args.dtype)
    with torch.device(dev):
        model = QwenImageTransformer2DModel(**config(args.layers)).to(dtype).eval()
        cn = None
        if with_cn:
            cn = QwenImageControlNetModel(**config(args.cn_layers, True)).to(dtype).eval()
    h = w = args.size // 16
    x = torch.randn(1, h * w, 64, device=dev, dtype=dtype)
    cond = torch.randn(1, h * w, 64, device=dev, dtype=dtype)
    enc = torch.randn(1, args.text, 3584, device=dev, dtype=dtype)
    t = torch.tensor([0.5], device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()

    @torch.inference_mode()
    def step():
        res = None
        if cn is not None:
            res = cn(
                hidden_states=x, controlnet_cond=cond, conditioning_scale=1.0,
                encoder_hidden_states=enc, timestep=t, img_shapes=[(1, h, w)], return_dict=False,
            )  # fmt: skip
        model(x, enc, None, t, [(1, h, w)], controlnet_block_samples=res)
        sync()

    peak = (
        torch.cuda.max_memory_allocated
        if dev == "cuda"
        else lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    result = timed(step, args.repeats, peak=peak)
    params = cn.parameters() if cn is not None else ()
    result["weight_bytes"] = sum(p.numel() * p.element_size() for p in params)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks")
    ap.add_argument("--cn-layers", type=int, default=1, help="ControlNet blocks (InstantX: 5)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--text", type=int, default=64, help="text tokens")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heads", type=int, default=24, help="width = heads x 128 (real: 24)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global HEADS
    HEADS = args.heads
    preload_openblas()  # re-executes once with OpenBLAS on Linux CPU
    print(f"BLAS: {blas_in_use()}")

    if args.side:
        who, mode = args.side.split("-")
        run = run_ref if who == "ref" else run_ours
        print(json.dumps(run(args, mode == "cn")))
        return

    results = {}
    for side in ("ref-base", "ref-cn", "ours-base", "ours-cn"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    tokens = (args.size // 16) ** 2
    print(
        f"one denoising step, width {args.heads * 128}, transformer {args.layers} layers + "
        f"ControlNet {args.cn_layers} layers, {args.size}x{args.size} ({tokens} image tokens) + "
        f"{args.text} text tokens, "
        f"{args.dtype}, device={args.device}"
    )
    added = {}
    for who, name in (("ref", "diffusers"), ("ours", "qwen-mlx")):
        base, cn = results[f"{who}-base"], results[f"{who}-cn"]
        added[who] = cn["median_s"] - base["median_s"]
        mem = (cn["peak_bytes"] - base["peak_bytes"]) / 2**20
        print(
            f"  {name:10s} step {base['median_s']:.4f} s -> {cn['median_s']:.4f} s with the "
            f"ControlNet: +{added[who]:.4f} s/step ({100 * added[who] / base['median_s']:.0f} %); "
            f"peak +{mem:.0f} MiB (ControlNet weights {cn['weight_bytes'] / 2**20:.0f} MiB)"
        )
    if added["ref"] > 0:
        print(f"  ratio of added cost qwen-mlx / diffusers: {added['ours'] / added['ref']:.2f}x")
    ratio = results["ours-cn"]["median_s"] / results["ref-cn"]["median_s"]
    print(f"  ratio of the whole step with ControlNet qwen-mlx / diffusers: {ratio:.2f}x")
    if args.device == "cpu":
        print("  (CPU peak for diffusers is process max RSS; for qwen-mlx MLX's peak allocation)")


if __name__ == "__main__":
    main()
