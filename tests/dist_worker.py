"""One rank of a test job (tests/test_distributed.py starts N of these over loopback).

    python dist_worker.py tensor|cfg CKPT OUT [--ckpt-for-rank R=PATH] [--quantize BITS]

tensor: loads CKPT's transformer (rank R reads PATH instead: a corrupt copy), sharded over the
group when there is one, runs one forward pass on fixed inputs; rank 0 writes OUT/out.npy,
every rank OUT/bytes.<rank> (its parameter bytes).
cfg: the whole transformer on every rank; one true-CFG velocity (cond = row 0, uncond = row 1
of the fixed inputs), each rank computing its branch when there is a group; rank 0 writes it.

    python dist_worker.py pipe CKPT OUT --parallel MODE[,MODE...] [--seeds 1,2,3] [--cfg 4]
        [--edit VAE_AREA,CONDITION_AREA] [--lora FILE] [--cache SPEC] [--steps N]
        [--controlnet DIR]

pipe: ``QwenImagePipeline.from_pretrained(CKPT, parallel=MODE)`` and ``generate``, for each
MODE in turn; rank 0 writes OUT/MODE/latents-<seed>.npy (the last step's, for the seeds it
sampled itself) and OUT/MODE/image-<seed>.npy for every image it yields, every rank
OUT/MODE/mode.<rank> (the mode the job ran). ``--edit``: an Edit checkpoint, editing two
fixed images; ``--lora``: a LoRA loaded (scale 0.8) before the first generation;
``--cache``: a step cache; ``--controlnet``: a ControlNet with a fixed control image (0.8);
``--cancel-on-rank R``: every rank passes a CancelToken, rank R cancels its own (rank 0 after
its first step, another at once).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from qwen_mlx.distributed import CfgSplit, World, parameter_bytes, read_sharded, report_errors
from qwen_mlx.io import read_json
from qwen_mlx.models.transformer import QwenImageTransformer
from qwen_mlx.pipelines.sampler import true_cfg

SHAPES = [[(1, 3, 4)]] * 2


def inputs(config: dict):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, config["in_channels"])).astype(np.float32)
    enc = rng.standard_normal((2, 5, config["joint_attention_dim"])).astype(np.float32)
    mask = np.ones((2, 5), dtype=np.int32)
    mask[1, 3:] = 0
    return mx.array(x), mx.array(enc), mx.array(mask), mx.array([0.7, 0.3])


def load(folder: Path, world: World, quantize: int | None, mode: str) -> QwenImageTransformer:
    config = read_json(folder / "config.json")
    if world.distributed and mode == "tensor":
        weights = read_sharded(folder, world.rank, world.size)
        return QwenImageTransformer.from_weights(
            config, weights, where=str(folder), quantize=quantize, group=world.group
        )
    weights = read_sharded(folder, 0, 1)
    return QwenImageTransformer.from_weights(config, weights, where=str(folder), quantize=quantize)


def pipe(args) -> None:
    """One pipeline, each mode of ``--parallel`` (comma-separated) in turn: one job startup."""
    from qwen_mlx import GenerationRequest, QwenImagePipeline
    from qwen_mlx.pipelines.denoise import CancelToken, StepEvent
    from qwen_mlx.pipelines.edit import QwenImageEditPipeline

    modes = args.parallel.split(",") if args.parallel else [None]
    world = World.init()
    with report_errors(world):
        size, images = {"width": 32, "height": 32}, ()
        if args.edit:  # the tiny models' small sizing areas (tests/tiny_edit.py's)
            vae_area, condition_area = (int(a) for a in args.edit.split(","))
            QwenImageEditPipeline.vae_image_area = vae_area
            QwenImageEditPipeline.condition_image_area = condition_area
            rng = np.random.default_rng(0)
            images = tuple(
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                for w, h in ((60, 40), (24, 36))
            )
            size = {}
        cls = QwenImageEditPipeline if args.edit else QwenImagePipeline
        pipe = cls.from_pretrained(args.ckpt, parallel=modes[0])
        if args.lora:
            pipe.load_lora(args.lora, 0.8)
        control = {}
        if args.controlnet:
            pipe.load_controlnet(args.controlnet)
            rng = np.random.default_rng(1)
            image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            control = {"control_images": (image,), "control_scale": 0.8}
        if args.cache:
            from qwen_mlx.step_cache import parse_spec

            pipe.enable_cache(parse_spec(args.cache))
        seeds = tuple(int(s) for s in args.seeds.split(","))
        req = GenerationRequest(
            prompt="a red fox", negative_prompt="blurry, a long negative prompt", steps=args.steps,
            cfg=args.cfg, seeds=seeds, images=images, **size, **control,
        )  # fmt: skip
        for mode in modes:
            pipe.parallel = mode
            out = args.out / str(mode)
            out.mkdir(parents=True, exist_ok=True)
            token = CancelToken()
            if args.cancel_on_rank is not None and world.rank == args.cancel_on_rank > 0:
                token.cancel()  # a rank that sees no events cancels at once
            for event in pipe.generate(req, cancel=token):
                if isinstance(event, StepEvent):
                    np.save(out / f"latents-{event.seed}.npy", np.array(event.latents))
                    if args.cancel_on_rank == 0:
                        token.cancel()  # rank 0: after its first step
                else:
                    np.save(out / f"image-{event.seed}.npy", np.asarray(event.image))
                    (out / f"meta-{event.seed}.json").write_text(json.dumps(event.metadata))
            (out / f"mode.{world.rank}").write_text(str(getattr(pipe, "parallel_mode", None)))
    sys.exit(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["tensor", "cfg", "pipe"])
    ap.add_argument("--parallel", default=None)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--ckpt-for-rank", default=None)
    ap.add_argument("--quantize", type=int, default=None)
    ap.add_argument("--edit", default=None, help="pipe: Edit checkpoint; VAE,COND areas")
    ap.add_argument("--lora", default=None, help="pipe: this LoRA at scale 0.8")
    ap.add_argument("--cache", default=None, help="pipe: a step cache (--cache's spec)")
    ap.add_argument("--steps", type=int, default=2, help="pipe: denoising steps")
    ap.add_argument("--controlnet", default=None, help="pipe: this ControlNet, a control image")
    ap.add_argument("--cancel-on-rank", type=int, default=None, help="pipe: this rank cancels")
    args = ap.parse_args()
    if args.mode == "pipe":
        return pipe(args)
    world = World.init()
    with report_errors(world):
        folder = args.ckpt / "transformer"
        if args.ckpt_for_rank:
            rank, path = args.ckpt_for_rank.split("=", 1)
            if int(rank) == world.rank:
                folder = Path(path) / "transformer"
        with world.agree("loading the transformer"):
            model = load(folder, world, args.quantize, args.mode)
            mx.eval(model.parameters())
        x, enc, mask, _ = inputs(read_json(folder / "config.json"))
        sigma = mx.array([0.7])
        if args.mode == "tensor":
            out = model(*inputs(read_json(folder / "config.json")), SHAPES)
            world.run(out, "running the transformer")
        elif world.distributed:  # cfg: one branch per rank, one all_gather
            split = CfgSplit.of(world)
            rows = split.rows(1)
            v = model(x[:1], enc[rows], mask[rows], sigma, SHAPES[:1])
            out = true_cfg(*split.gather(v), 4.0)
        else:  # cfg in one process: the [cond; uncond] batch, as the pipeline runs it
            v = model(mx.concatenate([x[:1], x[:1]]), enc, mask, sigma, SHAPES)
            out = true_cfg(v[:1], v[1:], 4.0)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"bytes.{world.rank}").write_text(str(parameter_bytes(model)))
        if world.is_main:
            np.save(args.out / "out.npy", np.array(out))
    sys.exit(0)


if __name__ == "__main__":
    main()
