"""Full-size check: a random checkpoint in the released layout, converted and run.

    python scripts/check_fullsize.py --root /big/disk/qwen-fullsize       # about 60 GB of disk
    python scripts/check_fullsize.py --root /tmp/fs --layers 4 --text-layers 2   # reduced depth

Not part of the test suite (the full run needs about 60 GB of disk and an hour on a CPU).
Stages, each in its own process (its peak RSS comes from ``wait4``):

1. write: the released layout at full width (``tests/fullsize.py``: names, shapes and shards
   from the released configs), random bf16 values written straight to the safetensors shards one
   chunk at a time; ``--layers`` / ``--text-layers`` cut the depth to save disk.
2. convert, per variant: ``qwen-mlx convert`` (bf16, ``--quantize 8``, ``--quantize 4``).
3. adaln, per variant: the adaLN table for one step (``qwen_mlx.adaln.compute_modulation`` on
   the converted weights, as the pipeline builds it), timed alone; ``adaln-mlx`` (in
   ``--stages``) times it again with MLX's own half-precision quantized CPU kernel, the one
   ``quantize.QuantizedLinear`` replaces on the CPU.
4. generate, per variant: ``qwen-mlx generate`` at 64x64, one step, a fresh adaLN cache.

The table prints each stage's seconds and peak RSS beside ``qwen_mlx.memory``'s estimate (for
generate: the peak the CLI checks before loading; convert and adaln have no estimate there, the
notes give what bounds them). A converted variant is deleted after its run unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

VARIANTS = {"bf16": [], "q8": ["--quantize", "8"], "q4": ["--quantize", "4"]}
GiB = 2**30
CLI = [str(Path(sys.executable).parent / "qwen-mlx")]  # the console script of this venv


def run(cmd: list[str], env: dict | None = None, quiet: bool = False) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, output) of one process; its output streams through."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not quiet:
            print(f"    {line}", end="", flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(cmd)}")
    return seconds, usage.ru_maxrss * 1024, "".join(lines)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def generate_estimate(dst: Path) -> tuple[int, str]:
    """What ``qwen-mlx generate`` at 64x64 with CFG and the adaLN cache is estimated to peak at,
    on this machine (a CPU adds materialised attention scores)."""
    from qwen_mlx import memory
    from qwen_mlx.loading import resolve

    source = resolve(dst)
    quantized = "quantization" in source.config("transformer")
    request = memory.Request(
        width=64,
        height=64,
        adaln_cache=True,
        vae_tile=memory.LEAN_DECODE_TILE if quantized else 128,
    )
    est = memory.source_estimate(source, request)
    return est.peak, est.peak_stage


def modulation_bytes(dst: Path) -> tuple[int, int]:
    """(all modulation weight bytes, the largest block's) of a converted transformer."""
    from qwen_mlx.io import folder_tensors
    from qwen_mlx.models.transformer import MODULATION_WEIGHTS

    per: dict[str, int] = {}
    for name, info in folder_tensors(dst / "transformer").items():
        if MODULATION_WEIGHTS.match(name):
            block = name.split(".")[1] if name.startswith("blocks.") else name
            per[block] = per.get(block, 0) + info.nbytes
    return sum(per.values()), max(per.values(), default=0)


# ----------------------------------------------------------------------------- child stages


def child_write(root: Path, layers: int | None, text_layers: int | None) -> None:
    from fullsize import write_checkpoint

    write_checkpoint(root, holes=False, layers=layers, text_layers=text_layers, log=print)


def child_adaln(dst: Path, steps: int, mlx_kernel: bool = False) -> None:
    """Build the adaLN table for ``steps`` sigmas as the pipeline does (lazy weights from the
    converted folder, modulation only), and print the seconds. ``mlx_kernel``: quantized layers
    run MLX's own half-precision CPU kernel (what they ran before ``quantize.QuantizedLinear``)."""
    import mlx.core as mx
    import mlx.nn as nn

    from qwen_mlx import quantize

    if mlx_kernel:
        quantize.QuantizedLinear.__call__ = nn.QuantizedLinear.__call__

    from qwen_mlx.adaln import compute_modulation
    from qwen_mlx.loading import load_component
    from qwen_mlx.models.transformer import (
        MODULATION_WEIGHTS,
        QwenImageTransformer,
        TransformerConfig,
    )
    from qwen_mlx.precision import PrecisionPlan
    from qwen_mlx.quantize import group_size_of

    folder = dst / "transformer"
    start = time.perf_counter()
    config, weights = load_component(folder)
    cfg = TransformerConfig.from_dict(config)
    stored = PrecisionPlan.from_config(config, cfg.num_layers)
    plan = QwenImageTransformer.target_plan(config, None, str(folder))
    mods = {k: v for k, v in weights.items() if MODULATION_WEIGHTS.match(k)}
    del weights
    sigmas = [1.0 - i / steps for i in range(steps)]
    table = compute_modulation(cfg, mods, stored, plan, sigmas, group_size_of(config))
    mx.eval([m for mod in table for block in mod.blocks for m in block])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mlx": mx.get_peak_memory()}))


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="working folder (about 60 GB)")
    p.add_argument("--layers", type=int, help="transformer depth (default 60: released)")
    p.add_argument("--text-layers", type=int, help="language-model depth (default 28)")
    p.add_argument("--variants", default="bf16,q8,q4", help="of bf16, q8, q4")
    p.add_argument("--stages", default="write,convert,adaln,generate")
    p.add_argument("--keep", action="store_true", help="keep the converted checkpoints")
    p.add_argument("--_write", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_adaln", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_mlx-kernel", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    src = args.root / "Qwen-Image-random"
    if args._write:
        return child_write(src, args.layers, args.text_layers)
    if args._adaln:
        return child_adaln(args._adaln, 1, args._mlx_kernel)

    from _openblas import preload_openblas

    preload_openblas()
    stages = set(args.stages.split(","))
    rows: list[tuple[str, float, int, str, str]] = []

    def row(stage: str, seconds: float, rss: int, estimate: str = "-", notes: str = "") -> None:
        rows.append((stage, seconds, rss, estimate, notes))
        print(f"  {stage}: {seconds:.1f} s, peak RSS {rss / GiB:.2f} GiB {notes}", flush=True)

    args.root.mkdir(parents=True, exist_ok=True)
    if "write" in stages and not (src / "model_index.json").is_file():
        print(f"writing {src}", flush=True)
        cmd = [sys.executable, __file__, "--root", str(args.root), "--_write"]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        cmd += ["--text-layers", str(args.text_layers)] if args.text_layers else []
        seconds, rss, _ = run(cmd)
        row("write", seconds, rss, notes=f"{disk_bytes(src) / 1e9:.1f} GB on disk")
    for variant in args.variants.split(","):
        dst = args.root / f"mlx-{variant}"
        if "convert" in stages:
            print(f"converting {variant}", flush=True)
            shutil.rmtree(dst, ignore_errors=True)
            shards = [p.stat().st_size for p in src.rglob("*.safetensors")]
            seconds, rss, _ = run([*CLI, "convert", str(src), str(dst), *VARIANTS[variant]])
            notes = (
                f"{disk_bytes(dst / 'transformer') / 1e9:.1f} GB transformer written; "
                f"largest source shard {max(shards) / GiB:.2f} GiB"
            )
            row(f"convert {variant}", seconds, rss, notes=notes)
        # adaln-mlx: the same with MLX's half-precision CPU kernel (quantized variants only)
        kernels = [k for k in ("adaln", "adaln-mlx") if k in stages]
        for kernel in kernels if variant != "bf16" else kernels[:1]:
            print(f"adaLN table, {variant} ({kernel})", flush=True)
            cmd = [sys.executable, __file__, "--root", str(args.root), "--_adaln", str(dst)]
            seconds, rss, out = run([*cmd, *(["--_mlx-kernel"] if kernel == "adaln-mlx" else [])])
            inner = json.loads(out.strip().splitlines()[-1])["seconds"]
            total, block = modulation_bytes(dst)
            notes = (
                f"table {inner:.1f} s; modulation {total / 1e9:.2f} GB read "
                f"({total / 1e6 / inner:.0f} MB/s), largest block {block / GiB:.2f} GiB"
            )
            row(f"{kernel} {variant}", seconds, rss, notes=notes)
        if "generate" in stages:
            print(f"generating, {variant}", flush=True)
            peak, stage = generate_estimate(dst)
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "QWEN_MLX_CACHE": cache}
                out_png = Path(cache) / "fox.png"
                cmd = [*CLI, "generate", "--model", str(dst), "-p", "a red fox", "--width", "64"]
                cmd += ["--height", "64", "--steps", "1", "--seed", "1", "-o", str(out_png)]
                seconds, rss, out = run([*cmd, "--ignore-memory-limit"], env)
            notes = next((ln.strip() for ln in out.splitlines() if "peak memory" in ln), "")
            row(f"generate {variant}", seconds, rss, f"{peak / GiB:.2f} ({stage})", notes)
        if not args.keep and "convert" in stages:
            shutil.rmtree(dst, ignore_errors=True)

    depth = f"transformer {args.layers or 60} layers, language model {args.text_layers or 28}"
    print(f"\nfull width; {depth}; {os.cpu_count()} CPUs")
    print(f"{'stage':16s} {'seconds':>8s} {'peak RSS GiB':>13s} {'estimate GiB':>20s}  notes")
    for stage, seconds, rss, estimate, notes in rows:
        print(f"{stage:16s} {seconds:8.1f} {rss / GiB:13.2f} {estimate:>20s}  {notes}")


if __name__ == "__main__":
    main()
