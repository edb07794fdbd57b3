"""Several processes as one job: ring backend over loopback, 2 and 4 processes, free ports.

Each job runs tests/dist_worker.py under ``run_local`` (what ``mlx.launch --backend ring -n N``
does, keeping every rank's exit code) with a hard timeout; the single-process result is the
same worker as a group of one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import convert_tiny, launch_port
from tiny_transformer import build_transformer, save_checkpoint

from qwen_mlx.distributed import (
    CfgSplit,
    World,
    check_tensor_parallel,
    choose_mode,
    free_ports,
    run_local,
    split_seeds,
    weight_axis,
)

WORKER = str(Path(__file__).parent / "dist_worker.py")
JOB_TIMEOUT = 90.0  # seconds, per job (a 2-core CI machine; a job takes 1-5 s)
# A failing rank must end the job well inside this (measured: ~2 s on 2 cores).
FAILURE_DEADLINE = 30.0
ENV = {"QWEN_MLX_DIST_TIMEOUT": "20"}


def job(n: int, *args: str, env: dict | None = None, timeout: float = JOB_TIMEOUT):
    result = run_local(n, [sys.executable, WORKER, *args], timeout, {**ENV, **(env or {})})
    assert not result.timed_out, f"job of {n} timed out: {result.stderr}"
    return result


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny transformer with 4 heads (N = 2 and 4 divide them), width 128 so each rank's
    input slice of a quantized layer (128 / 2) is a whole quantization group."""
    root = tmp_path_factory.mktemp("dist")
    ref = build_transformer(
        "quantizable", std=0.1, num_attention_heads=4, joint_attention_dim=32, num_layers=2
    )
    src = save_checkpoint(ref, root / "src")
    return {
        "root": root,
        "f32": convert_tiny(src, root / "f32"),
        "q8": convert_tiny(src, root / "q8", quantize=8),  # float32 scales: exact comparison
    }


@pytest.fixture(scope="module")
def single(ckpt, tmp_path_factory):
    """The one-process result of each checkpoint (the same worker, a group of one)."""
    cache = {}

    def get(key: str) -> tuple[np.ndarray, int]:
        if key not in cache:
            out, (nbytes,) = run_tensor(ckpt, key, 1, tmp_path_factory.mktemp(f"single-{key}"))
            cache[key] = out, nbytes
        return cache[key]

    return get


def run_tensor(ckpt, key: str, n: int, out: Path) -> tuple[np.ndarray, list[int]]:
    result = job(n, "tensor", str(ckpt[key]), str(out))
    assert result.returncodes == [0] * n, result.stderr
    return np.load(out / "out.npy"), [int((out / f"bytes.{r}").read_text()) for r in range(n)]


@pytest.mark.parametrize("key", ["f32", "q8"])
def test_tensor_parallel_two_processes_match_one(ckpt, single, key, tmp_path):
    """Tensor parallel in float32 (and 8-bit with float32 scales) equals one process to 1e-5
    relative: the only difference is the summation order of the sharded-to-all partial
    products (measured 1.0e-6 float32, 7.9e-7 8-bit). Each rank holds <= 0.6x the weights
    (measured 0.537x float32; the replicated in/out layers are a larger share of a tiny model
    than of the real one, where the ratio is 0.501)."""
    single, one = single(key)
    split, per_rank = run_tensor(ckpt, key, 2, tmp_path / "2")
    assert rel(split, single) < 1e-5
    assert np.abs(split - single).max() > 0 or key == "q8"  # it really ran split
    if key == "f32":
        assert all(b <= 0.6 * one for b in per_rank), (per_rank, one)


def test_cfg_parallel_is_identical(ckpt, tmp_path):
    """CFG split over two processes (rank 0 the prompt branch, rank 1 the negative one, with a
    padded mask) gives the very velocity of the one-process [cond; uncond] batch: float32,
    bit for bit (each row of a batch is computed independently)."""
    outs = []
    for n in (1, 2):
        result = job(n, "cfg", str(ckpt["f32"]), str(tmp_path / str(n)))
        assert result.returncodes == [0] * n, result.stderr
        outs.append(np.load(tmp_path / str(n) / "out.npy"))
    assert np.array_equal(outs[0], outs[1])
    assert np.abs(outs[0]).max() > 0


def test_tensor_parallel_four_processes(ckpt, single, tmp_path):
    single, one = single("f32")
    split, per_rank = run_tensor(ckpt, "f32", 4, tmp_path / "4")
    assert rel(split, single) < 1e-5
    assert all(b <= 0.35 * one for b in per_rank), (per_rank, one)


def test_a_failing_rank_ends_the_job(ckpt, tmp_path):
    """Rank 1 sees a corrupt shard: every rank exits 1 promptly, rank 0 with one line naming
    rank 1 and the file; no rank waits for the others."""
    bad = tmp_path / "bad"
    (bad / "transformer").mkdir(parents=True)
    for f in (ckpt["f32"] / "transformer").iterdir():
        data = f.read_bytes()
        if f.name.endswith("00002-of-00035.safetensors"):
            data = data[:-40]  # truncated
        (bad / "transformer" / f.name).write_bytes(data)
    (bad / "model_index.json").write_bytes((ckpt["f32"] / "model_index.json").read_bytes())
    result = job(2, "tensor", str(ckpt["f32"]), str(tmp_path / "o"), "--ckpt-for-rank", f"1={bad}")
    assert result.returncodes == [1, 1]
    assert result.seconds < FAILURE_DEADLINE
    lines = result.stderr[0].strip().splitlines()
    assert len(lines) == 1, result.stderr[0]
    assert "rank 1 failed while loading the transformer" in lines[0]
    assert "00002-of-00035.safetensors" in lines[0]
    assert result.stderr[1].strip() == ""  # rank 0 reported it
    assert not (tmp_path / "o" / "out.npy").exists()


def test_a_missing_peer_times_out(ckpt, tmp_path):
    """Rank 0 of a two-process job whose rank 1 never starts: one line and a non-zero exit
    after the timeout (3 s here), instead of waiting forever in init (where MLX holds the GIL,
    so a watcher process ends it: SIGKILL)."""
    import json
    import os
    import subprocess

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": "0"}
    env["QWEN_MLX_DIST_TIMEOUT"] = "3"
    p = subprocess.run(
        [sys.executable, WORKER, "tensor", str(ckpt["f32"]), str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [
        "qwen-mlx: error: rank 0: no answer from the other processes after 3 s while joining "
        "the group (set QWEN_MLX_DIST_TIMEOUT to wait longer)"
    ]


# -- module-level logic (no processes)


def test_weight_axes_follow_mlx_shardings():
    assert weight_axis("blocks.3.attn.to_q.weight") == 0
    assert weight_axis("blocks.3.attn.add_v_proj.bias") == 0
    assert weight_axis("blocks.3.img_mlp.up.scales") == 0
    assert weight_axis("blocks.3.attn.to_out.weight") == -1
    assert weight_axis("blocks.3.attn.to_out.bias") is None
    assert weight_axis("blocks.3.txt_mlp.down.biases") == -1
    assert weight_axis("blocks.3.img_mod.weight") == -1
    assert weight_axis("blocks.3.img_mod.bias") is None
    assert weight_axis("blocks.3.attn.norm_q.weight") is None
    assert weight_axis("txt_in.weight") is None
    assert weight_axis("norm_out.linear.weight") is None


def test_tensor_parallel_preconditions():
    check_tensor_parallel({"num_attention_heads": 24, "attention_head_dim": 128}, 4)
    with pytest.raises(ValueError, match="do not divide"):
        check_tensor_parallel({"num_attention_heads": 24, "attention_head_dim": 128}, 5)
    quant = {"quantization": {"bits": 4, "group_size": 64}}
    with pytest.raises(ValueError, match="multiple of the quantization group size"):
        check_tensor_parallel({"num_attention_heads": 4, "attention_head_dim": 32, **quant}, 4)


def test_seed_and_cfg_splits():
    assert [split_seeds([5, 6, 7], r, 2) for r in range(2)] == [[5, 7], [6]]
    assert [(CfgSplit(r, 4).branch, CfgSplit(r, 4).pair) for r in range(4)] == [
        (0, 0), (1, 0), (0, 1), (1, 1)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="even number"):
        CfgSplit(0, 3)


def test_auto_mode():
    cfg = {"num_attention_heads": 24, "attention_head_dim": 128}

    def pick(size=2, fits=True, true_cfg=True, seeds=1, mode="auto", serving=False):
        return choose_mode(
            mode, size, fits=fits, true_cfg=true_cfg, seeds=seeds, config=cfg, serving=serving
        )

    assert pick(size=1) is None
    assert pick(fits=False) == "tensor"
    assert pick() == "cfg"
    assert pick(size=3, seeds=3) == "seeds"
    assert pick(true_cfg=False, seeds=2) == "seeds"
    with pytest.raises(ValueError, match="nothing to split across 2 processes"):
        pick(true_cfg=False)
    with pytest.raises(ValueError, match="needs --cfg above 1"):
        pick(mode="cfg", true_cfg=False)
    with pytest.raises(ValueError, match="even number"):
        pick(mode="cfg", size=3)
    with pytest.raises(ValueError, match="at least two seeds"):
        pick(mode="seeds")
    with pytest.raises(ValueError, match="do not divide"):
        pick(mode="tensor", size=5)
    # a server takes every request: one seed without true CFG runs on rank 0, the rest in step
    assert pick(true_cfg=False, serving=True) == "seeds"
    assert pick(mode="seeds", serving=True) == "seeds"
    with pytest.raises(ValueError, match="needs --cfg above 1"):
        pick(mode="cfg", true_cfg=False, serving=True)


def test_world_of_one_does_the_local_thing():
    world = World(None)
    assert (world.rank, world.size, world.is_main, world.distributed) == (0, 1, True, False)
    with pytest.raises(KeyError):
        with world.agree("x"):
            raise KeyError("y")


# -- the pipeline: QwenImagePipeline.from_pretrained(..., parallel=MODE).generate


@pytest.fixture(scope="module")
def one_process_pipe(tiny_4head_ckpt, tmp_path_factory) -> Path:
    """One process's latents and images for test_pipeline_modes_match_one_process."""
    out = tmp_path_factory.mktemp("one-process")
    one = job(1, "pipe", str(tiny_4head_ckpt), str(out), "--seeds", "1,2,3", timeout=300)
    assert one.returncodes == [0], one.stderr
    return out / "None"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_cancel_on_any_rank_stops_every_rank(tiny_4head_ckpt, rank, tmp_path):
    """Every rank passes a CancelToken to ``pipe.generate`` (cfg mode, three seeds); one rank
    cancels its own (rank 0 after its first step, rank 1 before any): the check before each
    step is shared, so both ranks raise Cancelled at the same step, exit 1 at once (no rank
    left waiting in a collective), rank 0 saying why in one line, and no image comes out."""
    args = ("--seeds", "1,2,3", "--parallel", "cfg", "--cancel-on-rank", str(rank))
    res = job(2, "pipe", str(tiny_4head_ckpt), str(tmp_path), *args, timeout=120)
    assert res.returncodes == [1, 1], res.stderr
    errors = [x for x in res.stderr[0].splitlines() if "error" in x]
    assert errors == ["qwen-mlx: error: cancelled"], res.stderr[0]
    assert not any("error" in x for x in res.stderr[1].splitlines()), res.stderr[1]
    assert not list((tmp_path / "cfg").glob("image-*.npy"))
    steps = len(list((tmp_path / "cfg").glob("latents-*.npy")))
    assert steps == (1 if rank == 0 else 0)


@pytest.mark.parametrize("n", [2, 4])
def test_pipeline_modes_match_one_process(tiny_4head_ckpt, one_process_pipe, n, tmp_path):
    """Three seeds, true CFG (a padded negative prompt), 2 steps at 32x32, float32: one
    process, then one N-process job running seeds, cfg and tensor in turn. Seeds and cfg give
    the very latents and images of one process; tensor the latents within 1e-5 relative
    (measured 1.4e-6 to 1.6e-6) and the same 8-bit images. Rank 0 yields every image. Three
    seeds leave ranks (seeds) or pairs (cfg, N = 4) without a seed in the last round: they
    sample a filler in step and drop it."""
    args = ("--seeds", "1,2,3", "--parallel", "seeds,cfg,tensor")
    res = job(n, "pipe", str(tiny_4head_ckpt), str(tmp_path), *args, timeout=300)
    assert res.returncodes == [0] * n, res.stderr
    ref = one_process_pipe
    own = {  # the seeds rank 0 samples itself
        "seeds": (1,) if n == 4 else (1, 3),
        "cfg": (1, 3) if n == 4 else (1, 2, 3),
        "tensor": (1, 2, 3),
    }
    for mode in ("seeds", "cfg", "tensor"):
        out = tmp_path / mode
        assert {(out / f"mode.{r}").read_text() for r in range(n)} == {mode}
        for s in (1, 2, 3):
            image, want = np.load(out / f"image-{s}.npy"), np.load(ref / f"image-{s}.npy")
            assert np.array_equal(image, want), (mode, s)
            sampled = (out / f"latents-{s}.npy").exists()
            assert sampled == (s in own[mode]), (mode, s)  # the others sampled it
        for s in own[mode]:
            got, want = np.load(out / f"latents-{s}.npy"), np.load(ref / f"latents-{s}.npy")
            if mode == "tensor":
                assert 0 < rel(got, want) < 1e-5
            else:
                assert np.array_equal(got, want), (mode, s)


def test_memory_picks_and_refuses_per_process(tiny_4head_ckpt, tmp_path):
    """Memory under mlx.launch is each process's plan in the job's mode: with a limit between
    the tensor share and one process's plan, --parallel auto runs tensor (one seed, true CFG:
    cfg otherwise) and the image is one process's; below the tensor share every rank refuses
    the job in one line naming the per-process plan, before it starts."""
    from qwen_mlx import GenerationRequest, QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(tiny_4head_ckpt))
    request = GenerationRequest(  # dist_worker's
        prompt="a red fox", negative_prompt="blurry, a long negative prompt", width=32,
        height=32, steps=2, cfg=4.0, seeds=(1,),
    )  # fmt: skip
    req = pipe.prepare(request)
    one = pipe.memory_estimate(req).peak
    tensor = pipe.memory_estimate(req, split="tensor", processes=2).peak
    assert tensor < one
    args = ("pipe", str(tiny_4head_ckpt))
    env = {"QWEN_MLX_MEMORY_LIMIT": str((one + tensor) // 2)}
    ok = job(2, *args, str(tmp_path / "ok"), "--parallel", "auto", env=env, timeout=300)
    assert ok.returncodes == [0, 0], ok.stderr
    assert (tmp_path / "ok" / "auto" / "mode.1").read_text() == "tensor"
    ref = job(1, *args, str(tmp_path / "one"), timeout=300)
    assert ref.returncodes == [0], ref.stderr
    got = np.load(tmp_path / "ok" / "auto" / "image-1.npy").astype(int)
    assert np.abs(got - np.load(tmp_path / "one" / "None" / "image-1.npy")).max() <= 1

    env = {"QWEN_MLX_MEMORY_LIMIT": str(tensor - 1)}
    no = job(2, *args, str(tmp_path / "no"), "--parallel", "auto", env=env, timeout=300)
    assert no.returncodes == [1, 1], no.stderr
    (line,) = [x for x in no.stderr[0].splitlines() if "error" in x]
    assert "per process (--parallel tensor, 2 processes)" in line, line
    assert not any("error" in x for x in no.stderr[1].splitlines()), no.stderr[1]
    assert not (tmp_path / "no" / "auto" / "mode.0").exists()


def test_edit_modes_match_one_process(tiny_edit_4head_ckpt, tmp_path):
    """Edit-2509/2511 (two input images, true CFG, 2 steps, two seeds): one 2-process job
    running seeds, cfg and tensor gives one process's images: seeds and cfg identical, tensor
    within one 8-bit level."""
    from tiny_edit import TEST_CONDITION_AREA, TEST_VAE_AREA

    args = ("--seeds", "4,7", "--edit", f"{TEST_VAE_AREA},{TEST_CONDITION_AREA}")
    one = job(1, "pipe", str(tiny_edit_4head_ckpt), str(tmp_path / "1"), *args, timeout=300)
    assert one.returncodes == [0], one.stderr
    modes = ("--parallel", "seeds,cfg,tensor")
    two = job(2, "pipe", str(tiny_edit_4head_ckpt), str(tmp_path / "2"), *args, *modes, timeout=300)
    assert two.returncodes == [0, 0], two.stderr
    for mode in ("seeds", "cfg", "tensor"):
        assert (tmp_path / "2" / mode / "mode.1").read_text() == mode
        for s in (4, 7):
            got = np.load(tmp_path / "2" / mode / f"image-{s}.npy").astype(int)
            want = np.load(tmp_path / "1" / "None" / f"image-{s}.npy").astype(int)
            assert got.shape == want.shape and got.shape[0] > 0
            bound = 1 if mode == "tensor" else 0
            assert np.abs(got - want).max() <= bound, (mode, s)


def test_tensor_parallel_with_a_lora(tiny_4head_ckpt, tmp_path):
    """A LoRA (attention, MLP and modulation layers, scale 0.8) under tensor parallel: fused
    into the float weights, then sliced; the latents are one process's with the same LoRA
    within 1e-5 relative, and far from those without it (the LoRA did apply)."""
    from tiny_lora import layout_tensors, random_factors, save
    from tiny_pipeline import TEXT_HIDDEN

    model = build_transformer(
        "diffusers", std=0.2, joint_attention_dim=TEXT_HIDDEN, num_attention_heads=4
    )
    modules = (
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mod.1",
        "transformer_blocks.0.txt_mlp.net.2", "transformer_blocks.1.attn.to_out.0",
        "transformer_blocks.1.img_mlp.net.0.proj",
    )  # fmt: skip
    lora = save(tmp_path / "lora.safetensors", layout_tensors("peft", random_factors(
        model, modules, rank=4, seed=3), None)[0])  # fmt: skip
    base = ("pipe", str(tiny_4head_ckpt))
    one = job(1, *base, str(tmp_path / "1"), "--lora", str(lora), timeout=300)
    plain = job(1, *base, str(tmp_path / "0"), timeout=300)
    two = job(2, *base, str(tmp_path / "2"), "--lora", str(lora), "--parallel", "tensor",
              timeout=300)  # fmt: skip
    assert one.returncodes == plain.returncodes == [0] and two.returncodes == [0, 0], two.stderr
    want = np.load(tmp_path / "1" / "None" / "latents-1.npy")
    got = np.load(tmp_path / "2" / "tensor" / "latents-1.npy")
    without = np.load(tmp_path / "0" / "None" / "latents-1.npy")
    assert 0 < rel(got, want) < 1e-5
    assert rel(without, want) > 1e-2


def test_step_caches_under_cfg_parallel(tiny_4head_ckpt, tmp_path):
    """First-Block Cache and TaylorSeer under --parallel cfg: each process caches its own CFG
    branch, so the pair skips what one process skips: the same images (float32, bit for bit),
    the same pass counts in the metadata, and some passes skipped."""
    base = ("pipe", str(tiny_4head_ckpt))
    for spec in ("fbcache:3", "taylorseer:2"):  # fbcache:3: seed 2's branches skip apart
        args = ("--cache", spec, "--steps", "5", "--seeds", "1,2")
        one = job(1, *base, str(tmp_path / spec / "1"), *args, timeout=300)
        two = job(2, *base, str(tmp_path / spec / "2"), *args, "--parallel", "cfg",
                  timeout=300)  # fmt: skip
        assert one.returncodes == [0] and two.returncodes == [0, 0], (spec, two.stderr)
        for s in (1, 2):
            ref, out = tmp_path / spec / "1" / "None", tmp_path / spec / "2" / "cfg"
            assert np.array_equal(np.load(out / f"image-{s}.npy"), np.load(ref / f"image-{s}.npy"))
            meta = json.loads((out / f"meta-{s}.json").read_text())
            want = json.loads((ref / f"meta-{s}.json").read_text())
            for key in ("cache", "cache_full_passes", "cache_passes"):
                assert meta[key] == want[key], (spec, key)
            assert meta["cache_passes"] == 10 and meta["cache_full_passes"] < 10, (spec, meta)


def test_controlnet_in_every_mode(tiny_4head_ckpt, tmp_path):
    """A ControlNet (two blocks, a control image, scale 0.8): seeds and cfg give one process's
    images bit for bit; tensor (the ControlNet whole on each process, its residuals added to
    the sharded transformer's replicated activations) the latents within 1e-5 relative."""
    from tiny_controlnet import build_controlnet, save_controlnet
    from tiny_pipeline import TEXT_HIDDEN

    net = build_controlnet(
        "diffusers", num_layers=2, seed=11, std=0.2, num_attention_heads=4,
        joint_attention_dim=TEXT_HIDDEN,
    )  # fmt: skip
    folder = save_controlnet(net, tmp_path / "cn")
    args = ("pipe", str(tiny_4head_ckpt))
    one = job(1, *args, str(tmp_path / "1"), "--controlnet", str(folder), "--seeds", "1,2",
              timeout=300)  # fmt: skip
    two = job(2, *args, str(tmp_path / "2"), "--controlnet", str(folder), "--seeds", "1,2",
              "--parallel", "seeds,cfg,tensor", timeout=300)  # fmt: skip
    assert one.returncodes == [0] and two.returncodes == [0, 0], two.stderr
    plain = job(1, *args, str(tmp_path / "0"), "--seeds", "1,2", timeout=300)
    assert plain.returncodes == [0], plain.stderr
    ref = tmp_path / "1" / "None"
    assert (
        rel(np.load(tmp_path / "0" / "None" / "latents-1.npy"), np.load(ref / "latents-1.npy"))
        > 1e-3
    )
    for mode in ("seeds", "cfg"):
        for s in (1, 2):
            got = np.load(tmp_path / "2" / mode / f"image-{s}.npy")
            assert np.array_equal(got, np.load(ref / f"image-{s}.npy")), (mode, s)
    got = np.load(tmp_path / "2" / "tensor" / "latents-1.npy")
    assert 0 < rel(got, np.load(ref / "latents-1.npy")) < 1e-5


def test_cli_under_mlx_launch(tiny_4head_ckpt, tmp_path):
    """The real launcher and the real command: ``mlx.launch --backend ring -n 2 -- qwen-mlx
    generate --parallel seeds``. Rank 0 alone prints and writes both PNGs (each with its own
    seed in its metadata); the launcher exits 0."""
    import subprocess

    from qwen_mlx.png import read_metadata

    bindir = Path(sys.executable).parent
    cmd = [
        str(bindir / "mlx.launch"), "--backend", "ring", "-n", "2",
        "--starting-port", str(launch_port()), "--",
        str(bindir / "qwen-mlx"), "generate", "--model", str(tiny_4head_ckpt), "-p", "a red fox",
        "--width", "32", "--height", "32", "--steps", "1", "--seed", "5", "--seed", "6",
        "-o", str(tmp_path / "fox.png"), "--parallel", "seeds",
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    assert p.returncode == 0, p.stderr
    wrote = [line for line in p.stdout.splitlines() if line.startswith("wrote")]
    assert sorted(wrote) == [
        f"wrote {tmp_path / 'fox-5.png'} (seed 5)",
        f"wrote {tmp_path / 'fox-6.png'} (seed 6)",
    ]
    assert sum("image(s) 32x32" in line for line in p.stdout.splitlines()) == 1
    assert [read_metadata(tmp_path / f"fox-{s}.png")["seed"] for s in (5, 6)] == [5, 6]


def test_slices_from_disk_equal_slices_in_memory(ckpt):
    """``read_sharded`` (memory-mapped, only this rank's rows or columns copied) gives the same
    arrays as slicing the loaded weights (``shard_weights``: diffusers folders, fused LoRAs),
    for each rank; together the slices are the whole tensor."""
    import mlx.core as mx

    from qwen_mlx.distributed import read_sharded, shard_weights
    from qwen_mlx.io import load_folder

    folder = ckpt["q8"] / "transformer"
    parts = [read_sharded(folder, r, 2) for r in range(2)]
    for r in range(2):
        mem = shard_weights(load_folder(folder), r, 2)
        assert parts[r].keys() == mem.keys()
        for k in mem:
            assert parts[r][k].dtype == mem[k].dtype and mx.array_equal(parts[r][k], mem[k]), k
    full = load_folder(folder)
    for k in ("blocks.0.attn.to_q.weight", "blocks.1.img_mlp.down.scales", "txt_in.weight"):
        axis = weight_axis(k)
        if axis is None:
            assert mx.array_equal(parts[0][k], full[k])
        else:
            assert mx.array_equal(mx.concatenate([p[k] for p in parts], axis=axis), full[k])


def test_magcache_calibration_is_refused_under_cfg_parallel(tiny_4head_ckpt):
    """Calibrating MagCache needs both CFG branches' residuals in one process: under a CFG
    split it is refused with one line before any step."""
    from qwen_mlx import GenerationRequest, QwenImagePipeline
    from qwen_mlx.errors import RequestError
    from qwen_mlx.step_cache import MagCacheConfig

    pipe = QwenImagePipeline.from_pretrained(str(tiny_4head_ckpt))
    pipe.enable_cache(MagCacheConfig(calibrate=True))
    pipe.cfg_split = CfgSplit(0, 2)
    req = GenerationRequest(prompt="a fox", width=32, height=32, steps=2, cfg=4.0, seeds=(1,))
    with pytest.raises(RequestError, match="MagCache calibration needs both CFG branches"):
        list(pipe.generate(req))
