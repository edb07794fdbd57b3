"""`make demo`: build a tiny random checkpoint in the released layout, convert it, run it.

The weights are random, so the output is noise: the demo proves the path, not the picture.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    args = ap.parse_args()

    import mlx.core as mx
    from tiny_transformer import build_transformer, save_checkpoint

    from convert import ConvertOptions, convert_checkpoint
    from qwen_mlx.models.transformer import QwenImageTransformer

    shutil.rmtree(args.out, ignore_errors=True)
    src = save_checkpoint(build_transformer("diffusers"), args.out / "hf-tiny")
    print(f"built a tiny random checkpoint in the released layout: {src}")
    dst = convert_checkpoint(src, args.out / "mlx-tiny", ConvertOptions(dtype="float32"))
    print(f"converted it with the real converter: {dst}")

    model = QwenImageTransformer.from_pretrained(dst / "transformer")
    h, w, T = 4, 6, 9
    latents = mx.random.normal((1, h * w, 16), key=mx.random.key(0))
    text = mx.random.normal((1, T, 16), key=mx.random.key(1))
    start = time.perf_counter()
    out = model(latents, text, None, mx.array([1.0]), [(1, h, w)])
    mx.eval(out)
    print(
        f"transformer forward: in {tuple(latents.shape)} -> out {tuple(out.shape)} "
        f"in {1e3 * (time.perf_counter() - start):.1f} ms, finite={bool(mx.isfinite(out).all())}"
    )


if __name__ == "__main__":
    main()
