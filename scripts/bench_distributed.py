"""Several processes as one job: bytes per step and time against one process, per mode.

    python scripts/bench_distributed.py [--processes 2] [--steps 2] [--width 256] [--side 16]

For each mode (cfg, seeds, tensor) it runs N processes over loopback (ring backend, this
machine) and one process doing the same work, with a random transformer of the given size:

* cfg: one process runs the true-CFG batch (cond + uncond) per step; N processes each run one
  branch and all_gather the velocity;
* seeds: one process runs N seeds one after another; N processes one seed each;
* tensor: one process runs the whole model; N processes the sharded one (MLX's sharded linears).

Bytes are counted: every ``mx.distributed`` collective a process issues in a step is wrapped and
its payload summed; "sent" is what the ring algorithm puts on the wire per process
(all_sum 2(N-1)/N x payload, all_gather (N-1) x payload). Then a table projects 1024x1024 on
two Macs for the released model (60 blocks, width 3072, bf16), from the same formulas, and the
time each link needs to carry it (nominal link rates, stated below).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_mlx.distributed import World, run_local  # noqa: E402
from qwen_mlx.models.transformer import QwenImageTransformer, TransformerConfig  # noqa: E402

# Nominal one-direction rates in bytes/s (not measured here): Thunderbolt 5 RDMA (JACCL) 80 Gb/s;
# IP over Thunderbolt (ring backend) ~20 Gb/s in practice on TB4/TB5 bridges; 10 GbE.
LINKS = {"TB5 RDMA": 80e9 / 8, "TB IP": 20e9 / 8, "10 GbE": 10e9 / 8}


# ----------------------------------------------------------------------------- one rank


class Counter:
    """Wraps mx.distributed.all_sum / all_gather: payload bytes and wire bytes per process."""

    def __init__(self, size: int) -> None:
        self.size, self.payload, self.sent = size, 0, 0
        self._sum, self._gather = mx.distributed.all_sum, mx.distributed.all_gather
        mx.distributed.all_sum = self.all_sum
        mx.distributed.all_gather = self.all_gather

    def all_sum(self, x, **kw):
        self.payload += x.nbytes
        self.sent += 2 * (self.size - 1) * x.nbytes // self.size
        return self._sum(x, **kw)

    def all_gather(self, x, **kw):
        self.payload += x.nbytes
        self.sent += (self.size - 1) * x.nbytes
        return self._gather(x, **kw)


def model_config(args) -> TransformerConfig:
    head_dim = 64
    return TransformerConfig(
        num_attention_heads=args.width // head_dim,
        attention_head_dim=head_dim,
        axes_dims_rope=(16, 24, 24),
        num_layers=args.layers,
        joint_attention_dim=args.width,
        in_channels=64,
        out_channels=16,
    )


def worker(args) -> None:
    world = World.init()
    mx.random.seed(0)  # identical random weights on every rank
    model = QwenImageTransformer(model_config(args))
    mx.eval(model.parameters())
    n = world.size
    mode = args.worker
    if mode == "tensor" and world.distributed:
        model.shard(world.group)
        mx.eval(model.parameters())
    side = args.side
    L, T = side * side, 16
    rng = mx.random.key(1)
    x = mx.random.normal((2, L, 64), key=rng)
    txt = mx.random.normal((2, T, args.width), key=mx.random.key(2))
    shapes = [[(1, side, side)]]
    counter = Counter(n)

    def step() -> None:
        if mode == "cfg":
            if world.distributed:  # one branch per process, then one all_gather
                b = world.rank % 2
                v = model(x[b : b + 1], txt[b : b + 1], None, mx.array([0.5]), shapes)
                world.all_gather(v)
            else:
                mx.eval(model(x, txt, None, mx.array([0.5, 0.5]), shapes * 2))
        elif mode == "seeds":
            seeds = 1 if world.distributed else args.processes
            for _ in range(seeds):
                mx.eval(model(x[:1], txt[:1], None, mx.array([0.5]), shapes))
        else:
            world.run(model(x[:1], txt[:1], None, mx.array([0.5]), shapes), "a step")

    step()  # warm up
    counter.payload = counter.sent = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    if world.is_main:
        print(
            json.dumps(
                {
                    "seconds": seconds,
                    "payload": counter.payload // args.steps,
                    "sent": counter.sent // args.steps,
                    "peak": mx.get_peak_memory(),
                }
            )
        )


# ----------------------------------------------------------------------------- driver


def projection(n: int = 2, tokens: int = 4096, text: int = 100) -> dict[str, int]:
    """Bytes each process sends per step at 1024x1024 for the released model, by mode."""
    width, blocks, bf16, f32 = 3072, 60, 2, 4
    # cfg: one all_gather of the float32 velocity (1, 4096, 64) per step
    cfg = (n - 1) * tokens * 64 * f32
    # tensor (no CFG): per block 2 all_sums after attention (image + text stream) and 2 after
    # the MLPs, in bf16; plus the two modulation all_sums (6*width) when not adaLN-cached
    act = 2 * (tokens + text) * width * bf16
    mod = 2 * 6 * width * bf16
    tensor = blocks * (act + mod) * 2 * (n - 1) // n
    return {"cfg": cfg, "seeds": 0, "tensor": tensor, "tensor + true CFG": 2 * tensor}


class _Rank:
    """A stand-in group (size and rank only) to build a sharded model's shapes, nothing run."""

    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n

    def rank(self) -> int:
        return 0


def weight_share(n: int, modulation: bool = True) -> float:
    """Per-process share of the released transformer's weights under tensor parallel over n
    (from the shapes: the lazily built model is never evaluated)."""
    from qwen_mlx.distributed import parameter_bytes, shard_transformer

    model = QwenImageTransformer(TransformerConfig())
    if not modulation:
        model.drop_modulation()
    full = parameter_bytes(model)
    shard_transformer(model, _Rank(n))
    return parameter_bytes(model) / full


def mib(b: float) -> str:
    return f"{b / 2**20:,.2f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--side", type=int, default=16, help="latent tokens per side (16: 256)")
    ap.add_argument("--worker", choices=["cfg", "seeds", "tensor"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    n = args.processes
    print(
        f"bench_distributed: {n} processes over loopback (ring), random transformer width "
        f"{args.width}, {args.layers} blocks, {args.side * args.side} image tokens, "
        f"{args.steps} steps (after one warm-up), float32, this machine's CPU"
    )
    print(f"| mode | bytes/step sent per process (counted) | payload | 1 process s/step | "
          f"{n} processes s/step | ratio | peak, 1 process | peak, rank 0 of {n} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    base = [sys.executable, __file__, *sys.argv[1:]]
    for mode in ("cfg", "seeds", "tensor"):
        res = []
        for procs in (1, n):
            job = run_local(procs, [*base, "--worker", mode], timeout=600)
            if job.returncodes != [0] * procs:
                raise SystemExit(f"{mode} with {procs} processes failed: {job.stderr[0][-400:]}")
            res.append(json.loads(job.stdout[0].strip().splitlines()[-1]))
        one, many = res
        print(
            f"| {mode} | {mib(many['sent'])} | {mib(many['payload'])} | {one['seconds']:.4f} | "
            f"{many['seconds']:.4f} | {many['seconds'] / one['seconds']:.2f} | "
            f"{mib(one['peak'])} | {mib(many['peak'])} |"
        )
    print()
    print("Projection: 1024x1024 on two Macs, released model (60 blocks, width 3072, bf16),")
    print("bytes each process sends per step and the time the link takes to carry them")
    print("(nominal rates: TB5 RDMA 80 Gb/s, IP over Thunderbolt ~20 Gb/s, 10 GbE 10 Gb/s).")
    print("| mode | bytes/step | " + " | ".join(LINKS) + " |")
    print("|---|---|" + "---|" * len(LINKS))
    for mode, b in projection().items():
        times = " | ".join(f"{b / rate * 1000:,.1f} ms" for rate in LINKS.values())
        print(f"| {mode} | {mib(b)} | {times} |")
    print()
    print("Tensor parallel, each process's share of the released transformer's weights:")
    for k in (2, 4):
        print(
            f"  N={k}: {weight_share(k):.3f} (adaLN cache, no modulation weights: "
            f"{weight_share(k, modulation=False):.3f})"
        )


if __name__ == "__main__":
    main()
