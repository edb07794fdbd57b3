"""`make demo`: build a tiny random Qwen-Image checkpoint in the released layout, convert it
with the real converter, and run `qwen-mlx generate` end to end, writing a PNG.

The weights are random, so the PNG is noise: the demo proves the path, not the picture. On a
Mac with real weights the same command is `qwen-mlx generate --model Qwen/Qwen-Image ...`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    args = ap.parse_args()

    from tiny_pipeline import build_checkpoint

    shutil.rmtree(args.out, ignore_errors=True)
    src, _ = build_checkpoint(args.out / "hf-tiny")
    print(f"built a tiny random checkpoint in the released layout: {src}")
    cli = [str(Path(sys.executable).with_name("qwen-mlx"))]
    dst = args.out / "mlx-tiny"
    subprocess.run([*cli, "convert", str(src), str(dst), "--dtype", "float32"], check=True)
    subprocess.run([*cli, "info", str(dst)], check=True)
    png = args.out / "demo.png"
    subprocess.run(
        [*cli, "generate", "--model", str(dst), "--prompt", "a red cube on a wooden table",
         "--width", "256", "--height", "192", "--steps", "8", "--seed", "42", "--output", str(png)],
        check=True,
    )  # fmt: skip
    print(f"demo image (noise: the weights are random): {png}")


if __name__ == "__main__":
    main()
