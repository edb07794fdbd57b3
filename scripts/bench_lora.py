"""LoRA costs at full width: load + fuse time, and an unfused LoRA on quantized linears.

Two measurements, each side in its own subprocess (so peak memory is its own):

* fuse: a rank-64 LoRA (alpha 8, the 2512-Lightning shape) on every linear of ``--blocks``
  full-width blocks (3072 wide, bfloat16): our read_lora + LoraStack.add (fused in float32, cast
  back) against diffusers' load_lora_weights path + fuse_lora on the same file; per block, and
  extrapolated to the 60-block model;
* side: every distinct block linear, quantized (``--bits``), at the tokens it sees (``--tokens``
  image, ``--text`` text): the plain quantized linear (= LoRA fused before quantizing) against the
  same linear with a rank-``--rank`` LoRA run beside it (LoraLinear); summed per block and
  extrapolated to a 60-block step.

Weights are random; correctness is the tests' job.

    python scripts/bench_lora.py                    # CPU: 1 block; 64 image, 16 text tokens
    python scripts/bench_lora.py --blocks 2 --tokens 4096 --text 128 --device gpu   # 1024x1024
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _openblas import blas_in_use, preload_openblas  # noqa: E402  (scripts/ is on sys.path)

FULL_LAYERS = 60
LINEARS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mod.1", "txt_mod.1",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)  # fmt: skip


def full_config(layers: int) -> dict:
    return dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=layers,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip


def linear_shape(name: str, dim: int = 3072) -> tuple[int, int]:
    """(out, in) of a block linear."""
    if "_mod" in name:
        return 6 * dim, dim
    if "net.0" in name:
        return 4 * dim, dim
    if "net.2" in name:
        return dim, 4 * dim
    return dim, dim


def write_lora(path: Path, blocks: int, rank: int, alpha: float) -> None:
    """A Lightning-style (diffusion_model.) bf16 LoRA on every block linear."""
    import mlx.core as mx

    tensors = {}
    for b in range(blocks):
        for name in LINEARS:
            out, inp = linear_shape(name)
            key = f"diffusion_model.transformer_blocks.{b}.{name}"
            tensors[f"{key}.lora_A.weight"] = (0.01 * mx.random.normal((rank, inp))).astype(
                mx.bfloat16
            )
            tensors[f"{key}.lora_B.weight"] = (0.01 * mx.random.normal((out, rank))).astype(
                mx.bfloat16
            )
            tensors[f"{key}.alpha"] = mx.array(alpha, dtype=mx.bfloat16)
    mx.save_safetensors(str(path), tensors)


def random_model(blocks: int, dtype: str):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from qwen_mlx.models.transformer import QwenImageTransformer, TransformerConfig

    model = QwenImageTransformer(TransformerConfig.from_dict(full_config(blocks)))
    params = [
        (k, (0.02 * mx.random.normal(v.shape)).astype(getattr(mx, dtype)))
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


# ----------------------------------------------------------------------------- sides


def fuse_ours(args) -> dict:
    import mlx.core as mx

    from qwen_mlx.lora import LoraStack, read_lora

    if args.device == "gpu":
        mx.set_default_device(mx.gpu)
    model = random_model(args.blocks, "bfloat16")
    mx.reset_peak_memory()
    start = time.perf_counter()
    lora = read_lora(args.lora)
    read = time.perf_counter() - start
    LoraStack(model).add(lora, 1.0)  # evaluates the fused weights
    total = time.perf_counter() - start
    return {"read_s": read, "total_s": total, "peak_bytes": mx.get_peak_memory()}


def fuse_ref(args) -> dict:
    import torch
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    with torch.device("cuda" if args.device == "gpu" else "cpu"):
        model = QwenImageTransformer2DModel(**full_config(args.blocks)).to(torch.bfloat16)
    model.eval()
    lora = Path(args.lora)
    start = time.perf_counter()
    sd, meta = QwenImagePipeline.lora_state_dict(
        str(lora.parent), weight_name=lora.name, return_lora_metadata=True
    )
    QwenImagePipeline.load_lora_into_transformer(
        sd, transformer=model, adapter_name="bench", metadata=meta
    )
    read = time.perf_counter() - start
    model.fuse_lora(lora_scale=1.0)
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"read_s": read, "total_s": total, "peak_bytes": peak}


def side(args) -> dict:
    """Each distinct block linear quantized, at the tokens it sees: fused (the plain quantized
    linear, as after fusing before quantizing) against the same linear with the LoRA beside."""
    import mlx.core as mx
    import mlx.nn as nn

    from qwen_mlx.lora import LoraLinear

    if args.device == "gpu":
        mx.set_default_device(mx.gpu)
    dtype = getattr(mx, args.dtype or ("bfloat16" if args.device == "gpu" else "float32"))
    out = {}
    for name in LINEARS:
        if "_mod" in name:
            continue  # one vector per image: negligible either way
        tokens = args.text if ("add_" in name or "txt_" in name) else args.tokens
        o, i = linear_shape(name)
        linear = nn.Linear(i, o)
        linear.update({"weight": (0.02 * mx.random.normal((o, i))).astype(dtype)})
        linear.update({"bias": mx.zeros((o,), dtype=dtype)})
        q = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=args.bits)
        q.set_dtype(dtype)  # scales and bias: the compute dtype
        wrapped = LoraLinear(q)
        wrapped.add(
            0.01 * mx.random.normal((args.rank, i)), 0.01 * mx.random.normal((o, args.rank))
        )
        x = mx.random.normal((1, tokens, i)).astype(dtype)
        mx.eval(q.parameters(), wrapped.parameters(), x)
        out[name] = {"tokens": tokens, "dtype": str(dtype).split(".")[-1]}
        for label, layer in (("fused", q), ("unfused", wrapped)):
            mx.eval(layer(x))  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                mx.eval(layer(x))
                times.append(time.perf_counter() - start)
            out[name][label] = statistics.median(times)
    return out


def child(args) -> None:
    result = {
        "fuse-ours": lambda: fuse_ours(args),
        "fuse-ref": lambda: fuse_ref(args),
        "side": lambda: side(args),
    }[args.child]()
    print("RESULT " + json.dumps(result))


def run_child(args, which: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=1, help="full-width blocks to build")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--tokens", type=int, default=64, help="image tokens")
    p.add_argument("--text", type=int, default=16, help="text tokens")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="compute dtype of the quantized linears (default: bfloat16 on gpu, float32 on cpu, "
        "where MLX emulates bfloat16 ~8x slower)",
    )
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--skip-ref", action="store_true", help="do not run diffusers")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--lora", help=argparse.SUPPRESS)
    args = p.parse_args()
    preload_openblas()  # re-executes once with OpenBLAS on Linux CPU
    if args.child:
        return child(args)
    print(f"BLAS: {blas_in_use()}")

    import mlx.core as mx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        write_lora(path, args.blocks, args.rank, args.alpha)
        sys.argv += ["--lora", str(path)]
        size = path.stat().st_size
        print(
            f"LoRA rank {args.rank} alpha {args.alpha:g} on {len(LINEARS)} linears x "
            f"{args.blocks} full-width block(s): {size / 2**20:.1f} MiB; mlx {mx.__version__}, "
            f"device {args.device}"
        )
        ours = run_child(args, "fuse-ours")
        per = ours["total_s"] / args.blocks
        print(
            f"fuse  ours:     read {ours['read_s']:.2f} s, read+fuse {ours['total_s']:.2f} s = "
            f"{per:.2f} s/block -> {per * FULL_LAYERS:.1f} s for {FULL_LAYERS} blocks "
            f"(peak {ours['peak_bytes'] / 2**30:.2f} GiB)"
        )
        if not args.skip_ref:
            ref = run_child(args, "fuse-ref")
            rper = ref["total_s"] / args.blocks
            print(
                f"fuse  diffusers: load {ref['read_s']:.2f} s, load+fuse_lora "
                f"{ref['total_s']:.2f} s = {rper:.2f} s/block -> {rper * FULL_LAYERS:.1f} s "
                f"for {FULL_LAYERS} blocks (peak RSS {ref['peak_bytes'] / 2**30:.2f} GiB); "
                f"ours/diffusers {ours['total_s'] / ref['total_s']:.2f}x"
            )
        res = run_child(args, "side")
        for name, r in res.items():
            print(
                f"step  {name:20s} {r['tokens']:5d} tokens, {args.bits}-bit {r['dtype']}: fused "
                f"{r['fused'] * 1e3:8.2f} ms, LoRA beside {r['unfused'] * 1e3:8.2f} ms "
                f"({r['unfused'] / r['fused']:.3f}x)"
            )
        fused = sum(r["fused"] for r in res.values())
        unfused = sum(r["unfused"] for r in res.values())
        print(
            f"step  all block linears (mod excluded): fused {fused * 1e3:.1f} ms/block, LoRA "
            f"beside {unfused * 1e3:.1f} ms/block ({unfused / fused:.3f}x): "
            f"+{(unfused - fused) * FULL_LAYERS:.2f} s per {FULL_LAYERS}-block step "
            f"(on {fused * FULL_LAYERS:.1f} s of quantized linears)"
        )


if __name__ == "__main__":
    main()
