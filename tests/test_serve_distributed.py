"""``mlx.launch ... qwen-mlx serve``: rank 0 serves HTTP, the other ranks follow its jobs.

Two processes, ring backend over loopback, free ports; the real launcher and the real command
(and, to kill one rank, the ranks started by hand as ``mlx.launch`` does). Images are compared
with one process's (``QwenImagePipeline`` in this process, same checkpoint and request).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from helpers import launch_port
from server_helpers import free_port, png_metadata, png_pixels, wait_healthy

from qwen_mlx.distributed import free_ports

BIN = Path(sys.executable).parent
START_TIMEOUT = 180.0  # two processes import, load and warm up on 2 busy cores (measured ~20 s)
# A lost process must end the server well inside this (measured: ~5 s, one idle ping).
LOST_DEADLINE = 30.0
ENV = {"QWEN_MLX_DIST_TIMEOUT": "60"}
PROMPT, NEGATIVE = "a red fox", " "

pytestmark = pytest.mark.timeout(600)


def reference(ckpt: Path, seeds: tuple[int, ...], cfg: float, steps: int = 2):
    """One process's images (uint8 RGB) of the request the tests send, by seed."""
    from qwen_mlx import GenerationRequest, QwenImagePipeline
    from qwen_mlx.request import ImageResult

    pipe = QwenImagePipeline.from_pretrained(str(ckpt))
    req = GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=32, height=32, steps=steps, cfg=cfg,
        seeds=seeds,
    )  # fmt: skip
    return {
        e.seed: np.asarray(e.image.convert("RGB"))
        for e in pipe.generate(req)
        if isinstance(e, ImageResult)
    }


class Group:
    """A 2-process server: under the real ``mlx.launch`` (``ranks=False``), or each rank
    started by hand on a loopback hostfile (``ranks=True``: what the launcher does, keeping
    each rank's process)."""

    def __init__(
        self, ckpt: Path, tmp: Path, *args: str, ranks: bool = False, cli: list[str] | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cli = cli or [str(BIN / "qwen-mlx")]
        serve = [*cli, "serve", "--model", str(ckpt), "--port", str(self.port)]
        env = {**os.environ, **ENV}
        self.logs = [tmp / f"serve-{self.port}-{r}.log" for r in range(2)]
        files = [open(p, "wb") for p in self.logs]  # noqa: SIM115 - the processes own them
        if ranks:
            hostfile = tmp / "hosts.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
            self.procs = [
                subprocess.Popen(
                    [*serve, *args],
                    env={**env, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(r)},
                    stdout=files[r],
                    stderr=subprocess.STDOUT,
                    cwd=tmp,
                )  # fmt: skip
                for r in range(2)
            ]
        else:
            launch = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", "2"]
            launch += ["--starting-port", str(launch_port()), "--"]
            self.procs = [
                subprocess.Popen(
                    [*launch, *serve, *args],
                    env=env,
                    stdout=files[0],
                    stderr=subprocess.STDOUT,
                    cwd=tmp,
                    start_new_session=True,  # its own group: Ctrl-C reaches every rank
                )  # fmt: skip
            ]
        for f in files:
            f.close()
        try:
            wait_healthy(self.url, self.procs, START_TIMEOUT)
        except RuntimeError as e:
            self.kill()
            raise RuntimeError(f"{e}: {self.output()}") from None

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.logs)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)

    def rank_pids(self) -> dict[int, int]:
        """The launcher's children (the ranks), by ``MLX_RANK`` (read from /proc)."""
        out = {}
        for entry in Path("/proc").iterdir():
            try:
                status = (entry / "status").read_text()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if f"PPid:\t{self.procs[0].pid}\n" in status:
                for item in environ:
                    if item.startswith(b"MLX_RANK="):
                        out[int(item[9:])] = int(entry.name)
        return out

    def stop(self, timeout: float = 60.0) -> int:
        """Stop rank 0 (SIGTERM): it stops the others; the launcher's exit code."""
        os.kill(self.rank_pids()[0], signal.SIGTERM)
        try:
            return self.procs[0].wait(timeout)
        finally:
            self.kill()


def a1111(url: str, **fields) -> httpx.Response:
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": 32, "height": 32}
    return httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, **fields}, timeout=120)


def a1111_pixels(response: httpx.Response) -> list[np.ndarray]:
    import base64

    assert response.status_code == 200, response.text
    return [png_pixels(base64.b64decode(im)) for im in response.json()["images"]]


def test_serve_under_mlx_launch(tiny_4head_ckpt, tmp_path):
    """``mlx.launch --backend ring -n 2 -- qwen-mlx serve`` (--parallel auto): the OpenAI API's
    three true-CFG images (cfg mode) and A1111's one CFG-free image (seeds mode: rank 0 makes
    it, rank 1 keeps step) are pixel-identical to one process's; a job interrupted mid-way
    answers 409 and the next job still matches (the ranks stayed in step); SIGTERM to rank 0
    stops both ranks cleanly (the launcher reports no failed rank and exits 0)."""
    want = reference(tiny_4head_ckpt, (5, 6, 7), 4.0)
    want_plain = reference(tiny_4head_ckpt, (9,), 1.0)
    group = Group(tiny_4head_ckpt, tmp_path)
    try:
        assert httpx.get(f"{group.url}/health").json()["status"] == "ok"
        info = httpx.get(f"{group.url}/api/info").json()
        assert (info["processes"], info["parallel"]) == (2, "auto")
        client = openai.OpenAI(base_url=f"{group.url}/v1", api_key="x", max_retries=0)
        out = client.images.generate(
            prompt=PROMPT, n=3, size="32x32",
            extra_body={"seed": 5, "steps": 2, "cfg": 4.0, "negative_prompt": NEGATIVE},
        )  # fmt: skip
        import base64

        pngs = [base64.b64decode(d.b64_json) for d in out.data]
        assert [png_metadata(p)["seed"] for p in pngs] == [5, 6, 7]
        for seed, png in zip((5, 6, 7), pngs, strict=True):
            assert np.array_equal(png_pixels(png), want[seed]), seed

        (plain,) = a1111_pixels(a1111(group.url, steps=2, seed=9, cfg_scale=1))
        assert np.array_equal(plain, want_plain[9])

        answer = {}
        thread = threading.Thread(
            target=lambda: answer.update(r=a1111(group.url, steps=100_000 // 100, seed=1))
        )
        thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = httpx.get(f"{group.url}/sdapi/v1/progress").json()["state"]
            if state["sampling_step"] > 0:
                break
            time.sleep(0.1)
        assert httpx.post(f"{group.url}/sdapi/v1/interrupt").status_code == 200
        thread.join(60)
        assert answer["r"].status_code == 409, answer["r"].text
        assert "interrupted at step" in answer["r"].text
        (again,) = a1111_pixels(a1111(group.url, steps=2, seed=9, cfg_scale=1))
        assert np.array_equal(again, want_plain[9])
    except BaseException:
        print(group.output())
        raise
    finally:
        code = group.stop()
    text = group.output()
    assert code == 0, text
    assert "stopped" in text and "exited with code" not in text and "was killed" not in text


def test_serve_tensor_parallel_and_a_lost_process(tiny_4head_ckpt, tmp_path):
    """``--parallel tensor``: the image equals one process's within one 8-bit level (the
    sharded sums round differently, within 1e-5 relative: see test_distributed). Then rank 1
    dies while the server idles: rank 0 notices within one ping and exits non-zero with one
    line, well inside LOST_DEADLINE."""
    want = reference(tiny_4head_ckpt, (5,), 4.0)[5]
    group = Group(tiny_4head_ckpt, tmp_path, "--parallel", "tensor", ranks=True)
    try:
        (image,) = a1111_pixels(a1111(group.url, steps=2, seed=5, cfg_scale=4))
        assert np.abs(image.astype(int) - want.astype(int)).max() <= 1
        group.procs[1].kill()
        start = time.monotonic()
        code = group.procs[0].wait(LOST_DEADLINE)
        took = time.monotonic() - start
    finally:
        group.kill()
    text = group.output()
    assert code != 0 and took < LOST_DEADLINE, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: stopped: another process of the job failed or stopped while checking the "
        "other processes"
    ], text


def test_serve_edit_under_two_processes(tiny_edit_4head_ckpt, tmp_path):
    """An Edit-2509/2511 server over two processes (ranks started by hand; the tiny models'
    small sizing areas, tests/small_edit_cli.py): the uploaded image travels to rank 1 as PNG
    and the OpenAI edit (true CFG: cfg mode) is pixel-identical to one process's edit. Ctrl-C
    (SIGINT to every rank) ends both with exit 0: the follower waits for rank 0's stop."""
    import base64
    import io

    from PIL import Image
    from tiny_edit import TEST_CONDITION_AREA, TEST_VAE_AREA

    from qwen_mlx import GenerationRequest
    from qwen_mlx.pipelines.edit import QwenImageEditPipeline
    from qwen_mlx.request import ImageResult

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    upload = io.BytesIO()
    picture.save(upload, format="PNG")
    pipe = QwenImageEditPipeline.from_pretrained(str(tiny_edit_4head_ckpt))
    pipe.vae_image_area, pipe.condition_image_area = TEST_VAE_AREA, TEST_CONDITION_AREA
    req = GenerationRequest(
        prompt="give it a hat", negative_prompt=NEGATIVE, steps=2, cfg=4.0, seeds=(3,),
        images=(picture,), image_names=("hat.png",),
    )  # fmt: skip
    (want,) = [e for e in pipe.generate(req) if isinstance(e, ImageResult)]
    cli = [sys.executable, str(Path(__file__).parent / "small_edit_cli.py")]
    group = Group(tiny_edit_4head_ckpt, tmp_path, ranks=True, cli=cli)
    try:
        assert httpx.get(f"{group.url}/api/info").json()["kind"] == "edit"
        client = openai.OpenAI(base_url=f"{group.url}/v1", api_key="x", max_retries=0)
        out = client.images.edit(
            image=("hat.png", upload.getvalue(), "image/png"), prompt="give it a hat",
            extra_body={"seed": 3, "steps": 2, "cfg": 4.0, "negative_prompt": NEGATIVE},
        )  # fmt: skip
        png = base64.b64decode(out.data[0].b64_json)
        assert png_metadata(png)["images"] == [{"file": "hat.png", "width": 60, "height": 40}]
        assert np.array_equal(png_pixels(png), np.asarray(want.image.convert("RGB")))
    except BaseException:
        print(group.output())
        raise
    finally:  # Ctrl-C in a terminal: SIGINT to every rank; rank 0 stops the group in step
        for p in group.procs:
            p.send_signal(signal.SIGINT)
        codes = [p.wait(60) for p in group.procs]
        group.kill()
    assert codes == [0, 0], group.output()
