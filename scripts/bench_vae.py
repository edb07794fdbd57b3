"""Decode speed and memory: our 2D MLX VAE against diffusers' causal 3D one, same device.

Builds the released VAE config (base_dim 96, z_dim 16, dim_mult [1,2,4,4]) with random weights
in diffusers, saves it, converts it with the real converter, loads ours, then decodes one random
latent per size with both. diffusers runs in a fresh child process per size so its memory
high-water mark is its own.

    python scripts/bench_vae.py --sizes 256 512            # CPU
    python scripts/bench_vae.py --sizes 1024 1328 --dtype bfloat16   # GPU (MLX CUDA / Metal)

Memory: ours is mx.get_peak_memory() (MLX allocator, weights included; "work" subtracts the
memory active before the call). diffusers on CUDA is torch.cuda.max_memory_allocated() over the
post-load baseline; on CPU it is the process RSS high-water mark (getrusage ru_maxrss) over the
RSS after loading: a rough figure that includes allocator caching.

On Linux CPU the script re-executes itself with OpenBLAS preloaded (scripts/_openblas.py): the
mlx[cpu] wheel's reference BLAS makes MLX convs ~10x slower; the diffusers child runs without it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _openblas import blas_in_use, preload_openblas  # scripts/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def diffusers_decode(vae_dir: str, z_path: str, out_path: str, dtype: str, runs: int,
                     warmup: int, queue) -> None:  # fmt: skip
    """Child process: load diffusers' VAE, time decode of one latent, report peak memory."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = getattr(torch, TORCH_DTYPES[dtype])
    vae = AutoencoderKLQwenImage.from_pretrained(vae_dir, torch_dtype=tdtype).to(device).eval()
    z = torch.from_numpy(np.load(z_path)).to(device, tdtype)[:, :, None]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    base = torch.cuda.memory_allocated() if device == "cuda" else rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            out = vae.decode(z).sample[:, :, 0]
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else maxrss_bytes()) - base
    np.save(out_path, out.float().clamp(-1, 1).permute(0, 2, 3, 1).cpu().numpy())
    how = "cuda max_memory_allocated" if device == "cuda" else "RSS high-water (ru_maxrss)"
    queue.put({"times": times, "peak": peak, "device": device, "how": how,
               "threads": torch.get_num_threads()})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256], help="square image sides")
    ap.add_argument("--runs", type=int, default=3, help="timed runs (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32")
    ap.add_argument(
        "--tile-size", type=int, default=None, help="our decode tile size in latent px (0: never)"
    )
    args = ap.parse_args()
    preload_openblas()  # re-executes once with OpenBLAS on Linux CPU
    print(f"BLAS: {blas_in_use()}")

    import mlx.core as mx
    import torch
    from diffusers import AutoencoderKLQwenImage
    from helpers import randomize_vae

    from qwen_mlx.convert import ConvertOptions, convert_checkpoint
    from qwen_mlx.models import vae as vae_mod

    tmp = Path(tempfile.mkdtemp(prefix="bench_vae_"))
    src, dst = tmp / "src", tmp / "mlx"
    torch.manual_seed(0)
    ref = AutoencoderKLQwenImage()  # the released config
    randomize_vae(ref)
    ref.save_pretrained(src / "vae")
    index = {"_class_name": "QwenImagePipeline", "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    (src / "model_index.json").write_text(json.dumps(index))
    n_params = sum(p.numel() for p in ref.parameters())
    del ref
    t0 = time.perf_counter()
    convert_checkpoint(src, dst, ConvertOptions(dtype=args.dtype))
    t_convert = time.perf_counter() - t0
    ours = vae_mod.QwenImageVAE.from_pretrained(dst / "vae")
    tile = vae_mod.DEFAULT_TILE_SIZE if args.tile_size is None else (args.tile_size or None)

    print(f"released VAE config, {n_params / 1e6:.1f} M params, random weights, {args.dtype}; "
          f"convert {t_convert:.1f} s")  # fmt: skip
    print(f"ours: MLX {mx.__version__} on {mx.default_device()}; median of {args.runs} runs "
          f"after {args.warmup} warmup")  # fmt: skip
    preload = os.environ.pop("LD_PRELOAD", None)  # children (diffusers) run without it
    if preload:
        print(f"ours with LD_PRELOAD={preload}; diffusers without")
    elif sys.platform == "linux" and mx.default_device() == mx.cpu:
        print("note: no LD_PRELOAD of OpenBLAS: MLX CPU convs run on the reference BLAS")
    rows = []
    ctx = mp.get_context("spawn")
    for size in args.sizes:
        if size % 8:
            raise SystemExit(f"--sizes must be multiples of 8, got {size}")
        h = size // 8
        z = np.random.default_rng(size).standard_normal((1, 16, h, h)).astype(np.float32)
        np.save(tmp / "z.npy", z)

        queue = ctx.Queue()
        child = ctx.Process(target=diffusers_decode, args=(
            str(src / "vae"), str(tmp / "z.npy"), str(tmp / "ref.npy"), args.dtype, args.runs,
            args.warmup, queue))  # fmt: skip
        child.start()
        theirs = queue.get()
        child.join()

        zm = mx.array(z.transpose(0, 2, 3, 1))
        mx.eval(zm)
        times = []
        for i in range(args.warmup + args.runs):
            if i == args.warmup:
                mx.reset_peak_memory()
                before = mx.get_active_memory()
            t0 = time.perf_counter()
            out = ours.decode(zm, tile_size=tile)
            mx.eval(out)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        peak = mx.get_peak_memory()
        ref_out = np.load(tmp / "ref.npy")
        got = np.array(out.astype(mx.float32))
        err = float(np.abs(got - ref_out).max() / np.abs(ref_out).max())
        t_ours, t_ref = statistics.median(times), statistics.median(theirs["times"])
        tiled = tile is not None and h > tile
        rows.append((size, t_ref, t_ours, peak, peak - before, theirs["peak"], err, tiled))
        print(f"  {size}: diffusers {t_ref:.3f} s ({theirs['device']}, "
              f"{theirs['threads']} threads), ours {t_ours:.3f} s", flush=True)  # fmt: skip

    mib = 2**20
    print(f"\ndiffusers memory: {theirs['how']} over the post-load baseline")
    print("size  diffusers_s  ours_s  ours/diffusers  ours_peak_MiB(total/work)  "
          "diffusers_peak_MiB  rel_err  tiled")  # fmt: skip
    for size, t_ref, t_ours, peak, work, tpeak, err, tiled in rows:
        print(f"{size:>4}  {t_ref:>11.3f}  {t_ours:>6.3f}  {t_ours / t_ref:>14.2f}  "
              f"{peak / mib:>13.0f} / {work / mib:<10.0f}  {tpeak / mib:>18.0f}  "
              f"{err:>7.1e}  {'yes' if tiled else 'no'}")  # fmt: skip


if __name__ == "__main__":
    main()
