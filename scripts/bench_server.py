"""`qwen-mlx serve`: per-request overhead against the bare pipeline call, and the time to the
first image from a warm server against a cold `qwen-mlx generate`, on the tiny checkpoint
(tests/tiny_pipeline.py, converted with the real converter).

* bare: ``pipe(prompt, ...)`` in this process, warm (weights loaded, prompt cached), to a PIL
  image: the work every request does;
* server: POST /v1/images/generations (b64_json) to a warm server on loopback: the same work
  plus validation, the memory guard, the queue, PNG metadata, base64 and HTTP; its
  ``Server-Timing`` header gives the job's own time, so the time outside it is measured too;
* cold CLI: `qwen-mlx generate` in a fresh process (imports, load, generate, write the PNG).

The tiny model makes each step cheap, so the difference is the server's own cost.

    python scripts/bench_server.py --size 64 --steps 4 --repeat 10
"""

from __future__ import annotations

import argparse
import base64
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    import httpx
    import mlx.core as mx
    from helpers import convert_tiny
    from server_helpers import Server
    from tiny_pipeline import build_checkpoint

    from qwen_mlx.server.engine import Engine

    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    model = convert_tiny(build_checkpoint(tmp / "hf")[0], tmp / "mlx")
    size, steps, prompt = args.size, args.steps, "a red cube on a table"

    # The bare call (this process) and the server request (a warm server on loopback), warm,
    # alternating so that a busy machine slows both alike.
    pipe = Engine.load(str(model)).pipe
    call = dict(width=size, height=size, num_inference_steps=steps, negative_prompt=" ")
    pipe(prompt, seed=0, **call)
    server = Server(model, cwd=tmp)
    body = {"prompt": prompt, "size": f"{size}x{size}", "steps": steps}
    bare, served, outside = [], [], []
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            start = time.perf_counter()
            res = c.post("/v1/images/generations", json=dict(body, seed=0))
            res.raise_for_status()
            base64.b64decode(res.json()["data"][0]["b64_json"])
            first_warm = time.perf_counter() - start
            mx.reset_peak_memory()
            for i in range(args.repeat):
                start = time.perf_counter()
                pipe(prompt, seed=i, **call)
                bare.append(time.perf_counter() - start)
                start = time.perf_counter()
                res = c.post("/v1/images/generations", json=dict(body, seed=i))
                res.raise_for_status()
                base64.b64decode(res.json()["data"][0]["b64_json"])
                served.append(time.perf_counter() - start)
                timing = dict(
                    part.strip().split(";dur=") for part in res.headers["Server-Timing"].split(",")
                )
                outside.append(served[-1] - float(timing["generate"]) / 1000)
        bare_peak = mx.get_peak_memory()
        server_peak = server.health()["memory"]["peak"]
    finally:
        server.stop()
    del pipe

    # -- a cold `qwen-mlx generate`
    cli = Path(sys.executable).parent / "qwen-mlx"
    start = time.perf_counter()
    subprocess.run(
        [str(cli), "generate", "--model", str(model), "--prompt", prompt, "--width", str(size),
         "--height", str(size), "--steps", str(steps), "--seed", "0", "-o",
         str(tmp / "cold.png")],
        check=True, capture_output=True,
    )  # fmt: skip
    cold = time.perf_counter() - start

    b, s = statistics.median(bare), statistics.median(served)
    diff = statistics.median(x - y for x, y in zip(served, bare, strict=True))
    print(f"tiny checkpoint, {size}x{size}, {steps} steps, CFG 4, median of {args.repeat}")
    print(f"bare pipeline call     {b * 1000:8.1f} ms   peak {bare_peak / 2**20:.0f} MiB")
    print(f"server request         {s * 1000:8.1f} ms   peak {server_peak / 2**20:.0f} MiB")
    print(f"server overhead        {diff * 1000:8.1f} ms per request (median of paired "
          f"differences; {s / b:.2f}x the call)")  # fmt: skip
    print(f"outside the job        {statistics.median(outside) * 1000:8.1f} ms per request "
          "(request time - the job's generate time from Server-Timing: HTTP, validation, "
          "memory guard, queue, base64)")  # fmt: skip
    print(f"first image: warm server {first_warm:.2f} s, cold `qwen-mlx generate` {cold:.2f} s "
          f"({cold / first_warm:.0f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
