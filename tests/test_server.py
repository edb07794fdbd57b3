"""`qwen-mlx serve` on loopback: the OpenAI client, A1111-shaped requests, bad inputs, a burst
against a full queue, interrupt and disconnect, and schemathesis on the server's own schema.

One server for the session (conftest's ``tiny_server``: the tiny checkpoint of
tests/tiny_pipeline.py); its memory limit ($QWEN_MLX_MEMORY_LIMIT 100 MiB) lets 64x64 through
and refuses 256x256 with advice.
Equality with `qwen-mlx generate` is exact (same seeds, same code path, same machine): pixels
and PNG metadata.
"""

from __future__ import annotations

import base64
import concurrent.futures
import re
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from server_helpers import (
    huge_png_header,
    png_file,
    png_metadata,
    png_pixels,
    png_text,
)
from typer.testing import CliRunner

from qwen_mlx.cli import app as cli_app

pytestmark = pytest.mark.timeout(300)
SMALL = {"size": "32x32", "extra_body": {"steps": 2}}


@pytest.fixture(scope="module")
def model(tiny_qwen_image):
    return tiny_qwen_image[1]


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def cli_generate(model, tmp_path, seeds, *args) -> dict[int, bytes]:
    """`qwen-mlx generate --seed S ...` in this process: {seed: PNG bytes}."""
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / "cli.png"
    seed_args = [a for s in seeds for a in ("--seed", str(s))]
    res = CliRunner().invoke(
        cli_app,
        ["generate", "--model", str(model), "--prompt", "a cube", "-o", str(out), *seed_args,
         *args],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    if len(seeds) == 1:
        return {seeds[0]: out.read_bytes()}
    return {s: (tmp_path / f"cli-{s}.png").read_bytes() for s in seeds}


# -- the OpenAI client


def test_generations_match_the_cli(client, model, tmp_path):
    """n=2 with seed 7 is seeds 7 and 8, pixel for pixel and metadata for metadata."""
    res = client.images.generate(
        model=str(model), prompt="a cube", n=2, size="32x48",
        extra_body={"seed": 7, "steps": 2, "cfg": 3.5},
    )  # fmt: skip
    served = [base64.b64decode(d.b64_json) for d in res.data]
    cli = cli_generate(
        model, tmp_path, [7, 8], "--steps", "2", "--cfg", "3.5", "--width", "32", "--height", "48"
    )
    for seed, png in zip((7, 8), served, strict=True):
        assert png_pixels(png).shape == (48, 32, 3)
        np.testing.assert_array_equal(png_pixels(png), png_pixels(cli[seed]))
        assert png_metadata(png) == png_metadata(cli[seed])
        assert png_text(png) == png_text(cli[seed])
    assert not np.array_equal(png_pixels(served[0]), png_pixels(served[1]))


def test_absent_fields_take_the_models_defaults(client):
    res = client.images.generate(prompt="a cube", size="32x32", extra_body={"seed": 1})
    meta = png_metadata(base64.b64decode(res.data[0].b64_json))
    assert (meta["steps"], meta["cfg"], meta["negative_prompt"]) == (50, 4.0, " ")
    res = client.images.generate(prompt="a cube", size="32x32", extra_body={"steps": 2})
    assert 0 <= png_metadata(base64.b64decode(res.data[0].b64_json))["seed"] < 2**31  # random


def test_url_response_and_models(client, model):
    res = client.images.generate(prompt="a cube", response_format="url", **SMALL)
    png = httpx.get(res.data[0].url, timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png_pixels(png.content).shape == (32, 32, 3)
    assert [m.id for m in client.models.list()] == [str(model)]


def test_edits_are_img2img_and_inpaint_as_the_cli(client, model, tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(source)
    mask = tmp_path / "mask.png"
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m).save(mask)
    common = {"seed": 3, "steps": 4}
    res = client.images.edit(
        image=source.read_bytes(), prompt="a cube", size="32x32",
        extra_body={**common, "strength": 0.5},
    )  # fmt: skip
    img2img = base64.b64decode(res.data[0].b64_json)
    res = client.images.edit(
        image=source.read_bytes(), mask=mask.read_bytes(), prompt="a cube", extra_body=common
    )
    inpaint = base64.b64decode(res.data[0].b64_json)
    args = ["--steps", "4", "--image", str(source)]
    cli = cli_generate(model, tmp_path / "a", [3], *args, "--strength", "0.5")
    np.testing.assert_array_equal(png_pixels(img2img), png_pixels(cli[3]))
    cli = cli_generate(model, tmp_path / "b", [3], *args, "--mask", str(mask))
    np.testing.assert_array_equal(png_pixels(inpaint), png_pixels(cli[3]))
    meta = png_metadata(inpaint)
    assert meta["strength"] == 0.6 and meta["mask"] and meta["image"]


# -- AUTOMATIC1111


def test_a1111_txt2img_and_img2img(server, client):
    body = {"prompt": "a cube", "seed": 11, "steps": 2, "cfg_scale": 3, "width": 32,
            "height": 32, "batch_size": 2, "n_iter": 1, "sampler_name": "Euler a"}  # fmt: skip
    with server.client() as c:
        res = c.post("/sdapi/v1/txt2img", json=body)
        assert res.status_code == 200, res.text
        assert re.fullmatch(r"queue;dur=[\d.]+, generate;dur=[\d.]+", res.headers["Server-Timing"])
        out = res.json()
        info = __import__("json").loads(out["info"])
        assert (info["seed"], info["all_seeds"]) == (11, [11, 12])
        assert len(out["images"]) == 2 and out["parameters"]["prompt"] == "a cube"
        assert info["infotexts"][1].startswith("a cube\nNegative prompt:")
        ours = client.images.generate(
            prompt="a cube", size="32x32", extra_body={"seed": 12, "steps": 2, "cfg": 3}
        )
        np.testing.assert_array_equal(
            png_pixels(base64.b64decode(out["images"][1])),
            png_pixels(base64.b64decode(ours.data[0].b64_json)),
        )
        init = "data:image/png;base64," + base64.b64encode(png_file()).decode()
        res = c.post(
            "/sdapi/v1/img2img",
            json={"prompt": "a cube", "init_images": [init], "denoising_strength": 0.5,
                  "steps": 4, "mask": base64.b64encode(png_file(mode="L", color=255)).decode()},
        )  # fmt: skip
        assert res.status_code == 200, res.text
        meta = png_metadata(base64.b64decode(res.json()["images"][0]))
        assert (meta["width"], meta["height"], meta["strength"]) == (32, 32, 0.5)


def test_a1111_options_models_progress(server, model):
    with server.client() as c:
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == str(model)
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": str(model)}).is_success
        res = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"})
        assert res.status_code == 400 and "serves" in res.json()["detail"]
        (entry,) = c.get("/sdapi/v1/sd-models").json()
        assert entry["title"] == entry["model_name"] == str(model)
        progress = c.get("/sdapi/v1/progress").json()
        assert progress["progress"] == 0 and progress["state"]["job_count"] == 0


# -- bad input: 4xx, one line, in each API's shape; nothing queued


BAD = [
    ("/v1/images/generations", {"prompt": "x", "size": "33x32"}, 400, "not a multiple of 8"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size must be"),
    ("/v1/images/generations", {"prompt": "x", "steps": 0}, 400, "steps must be at least 1"),
    ("/v1/images/generations", {"prompt": "x", "steps": 1001}, 400, "at most 1000"),
    ("/v1/images/generations", {"prompt": "x", "n": 11}, 400, "n:"),
    ("/v1/images/generations", {"size": "32x32"}, 400, "prompt: Field required"),
    ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, 400, "unknown model"),
    ("/v1/images/generations", {"prompt": "x", "seed": -1}, 400, "seed -1 is out of range"),
    ("/v1/images/generations", {"prompt": "x", "size": "256x256"}, 400, "; would fit: "),
    ("/sdapi/v1/txt2img", {"prompt": "x", "seed": -2}, 422, "seed must be -1"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 20, "height": 32}, 400, "multiple of 8"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": "high"}, 422, "cfg_scale"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["%%%"]}, 422, "not valid base64"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": []}, 422, "at least one"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["aGVsbG8="]}, 400, "not an image"),
]


def shaped_message(path: str, body: dict) -> str:
    if path.startswith("/v1/"):
        assert body["error"]["type"] and set(body["error"]) >= {"message", "type", "code"}
        return body["error"]["message"]
    assert set(body) == {"error", "detail", "body", "errors"}
    return body["detail"]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD)
def test_bad_input_is_a_one_line_4xx(server, path, body, status, message):
    with server.client() as c:
        res = c.post(path, json=body)
    assert res.status_code == status, res.text
    text = shaped_message(path, res.json())
    assert message in text and "\n" not in text and "Traceback" not in text
    assert "--ignore-memory-limit" not in text  # a CLI flag, not the server's
    assert server.health()["queue"] == 0


def test_uploads_are_checked_before_decoding(server):
    with server.client() as c:
        bomb = huge_png_header(10_000, 10_000)  # 100 MP in 60 bytes
        res = c.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", bomb)})
        assert res.status_code == 400 and "(100.0 MP); the limit is 50.0 MP" in res.text
        res = c.post(
            "/sdapi/v1/img2img",
            json={"prompt": "x", "init_images": [base64.b64encode(bomb).decode()]},
        )
        assert res.status_code == 400 and "limit is 50.0 MP" in res.json()["detail"]
        res = c.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.txt", b"hi")})
        assert res.status_code == 400 and "not an image" in res.json()["error"]["message"]
        res = c.post("/v1/images/edits", data={"prompt": "x"})
        assert res.status_code == 400 and "give an image" in res.json()["error"]["message"]
        big = b"\0" * (2 * 2**20)  # over --max-body-mb 1
        res = c.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", big)})
        assert res.status_code == 413 and "1 MiB limit" in res.json()["error"]["message"]
        res = c.post(
            "/sdapi/v1/txt2img",
            content=b'{"prompt": "' + b"x" * 2**21 + b'"}',
            headers={"content-type": "application/json"},
        )
        assert res.status_code == 413 and "limit" in res.json()["detail"]


def test_non_finite_is_a_500_and_the_server_keeps_serving(client):
    with pytest.raises(openai.InternalServerError) as e:
        client.images.generate(prompt="a cube", size="32x32", extra_body={"steps": 2, "cfg": 1e300})
    assert e.value.status_code == 500 and "non-finite" in e.value.body["message"]
    res = client.images.generate(prompt="a cube", **SMALL)
    assert png_pixels(base64.b64decode(res.data[0].b64_json)).std() > 0


# -- load: a burst against --max-queue 4


def test_burst_is_answered_200_or_429(server):
    body = {"prompt": "a burst", "size": "32x32", "steps": 30, "seed": 1}
    with server.client() as c:
        assert c.post("/v1/images/generations", json=body).status_code == 200
    before = server.health()["memory"]["active"]

    def one(_):
        with server.client() as c:
            return c.post("/v1/images/generations", json=body)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20), timeout=240))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429} and len(codes) == 20
    assert codes.count(200) >= 5 and codes.count(429) >= 1, codes  # 1 running + 4 waiting
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert "queue is full" in r.json()["error"]["message"]
        else:
            assert len(r.json()["data"]) == 1
    health = server.health()
    assert health["queue"] == 0
    # memory back to its level: the same weights and prompt cache, the buffer cache cleared
    assert health["memory"]["active"] <= before * 1.02 + 2**20, (before, health["memory"])


# -- interrupt and disconnect


def wait_for_step(server, at_least: int = 1, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    with server.client() as c:
        while time.monotonic() < deadline:
            p = c.get("/sdapi/v1/progress").json()
            if p["state"]["sampling_step"] >= at_least:
                return p
            time.sleep(0.02)
    raise AssertionError("the job did not start")


def wait_idle(server, timeout: float = 10) -> float:
    start = time.monotonic()
    while server.health()["queue"]:
        assert time.monotonic() - start < timeout, "the job was not cancelled"
        time.sleep(0.05)
    return time.monotonic() - start


def test_interrupt_stops_the_running_job(server):
    answer = {}

    def long_job():
        with server.client() as c:
            answer["res"] = c.post(
                "/sdapi/v1/txt2img",
                json={"prompt": "long", "steps": 1000, "width": 64, "height": 64},
            )

    t = threading.Thread(target=long_job)
    t.start()
    progress = wait_for_step(server, 2)
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    with server.client() as c:
        assert c.post("/sdapi/v1/interrupt").status_code == 200
        t.join(30)
        res = answer["res"]
        assert res.status_code == 409 and "interrupted at step" in res.json()["detail"]
        step = int(res.json()["detail"].split("at step ")[1].split("/")[0])
        assert step < 1000
        assert c.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True
    assert server.health()["last_job"]["state"] == "cancelled"


def test_a_client_that_disconnects_cancels_its_job(server):
    with server.client() as c, pytest.raises(httpx.ReadTimeout):
        c.post(
            "/v1/images/generations",
            json={"prompt": "gone", "size": "64x64", "steps": 1000},
            timeout=httpx.Timeout(60, read=1.0),
        )
    wait_idle(server)
    last = server.health()["last_job"]
    assert last["state"] == "cancelled" and "disconnected" in last["error"]


def test_cancel_stops_within_one_step(model):
    """The engine checks the token after every step: cancelled at step 3, it stops at 3."""
    from qwen_mlx.server.engine import Cancelled, CancelToken, Engine, Params

    engine = Engine.load(str(model))
    plan = engine.check(Params("a cube", width=32, height=32, steps=50, seed=0))
    token, seen = CancelToken(), []

    def on_step(s):
        seen.append(s.step)
        if s.step == 3:
            token.cancel("interrupted")

    with pytest.raises(Cancelled, match="interrupted at step 3/50"):
        list(engine.run(plan, token, on_step))
    assert seen == [1, 2, 3]


def test_load_options_as_generate(model, tmp_path):
    """The engine loads LoRAs and the Lightning preset as `generate` does: same defaults (4
    steps, CFG 1), same pixels, same metadata (LoRA name, scale and digest)."""
    from tiny_lora import MODULES, layout_tensors, random_factors, save
    from tiny_pipeline import TEXT_HIDDEN
    from tiny_transformer import build_transformer

    from qwen_mlx.server.engine import CancelToken, Engine, Params

    blocks = tuple(m for m in MODULES if not m.startswith("transformer_blocks.2."))
    ref = build_transformer("diffusers", std=0.2, joint_attention_dim=TEXT_HIDDEN)
    tensors, _ = layout_tensors("diffusion_model", random_factors(ref, blocks, 4, 1), 2.0)
    lora = save(tmp_path / "lightning.safetensors", tensors)
    engine = Engine.load(str(model), loras=[(lora, 0.8)], lightning=4)
    plan = engine.check(Params("a cube", width=32, height=48, seed=2))
    assert (plan.steps, plan.cfg) == (4, 1.0)
    (result,) = engine.run(plan, CancelToken(), lambda s: None)
    cli = cli_generate(
        model, tmp_path / "cli", [2], "--width", "32", "--height", "48", "--lightning", "4",
        "--lora", f"{lora}:0.8",
    )  # fmt: skip
    np.testing.assert_array_equal(png_pixels(result.png), png_pixels(cli[2]))
    assert png_metadata(result.png) == png_metadata(cli[2])
    assert "Lightning: 4 steps, LoRAs: lightning.safetensors:0.8" in png_text(result.png)


def test_masks_follow_each_apis_convention():
    """OpenAI: transparent = edit; a plain grey mask: white = repaint (A1111, the CLI)."""
    from qwen_mlx.server.common import as_mask

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    rgba.putpixel((1, 1), (0, 0, 0, 0))
    m = np.asarray(as_mask(rgba))
    assert m[1, 1] == 255 and m.sum() == 255
    grey = Image.new("L", (4, 4), 0)
    grey.putpixel((2, 2), 255)
    assert np.asarray(as_mask(grey))[2, 2] == 255


# -- schemathesis: the server's own OpenAPI schema, bounded examples


def test_schema_fuzz(server):
    """Every operation of /openapi.json, 6 generated examples each: never a 5xx (generation
    requests run for real; the memory limit keeps them small), and every answer, errors
    included, has a status, content type and body the schema declares."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_schema_conformance,
    ]  # fmt: skip

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures, calls = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=6, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy())
        def run(case):
            nonlocal calls
            calls += 1
            try:
                case.call_and_validate(base_url=server.url, checks=checks, timeout=60)
            except Exception as e:  # noqa: BLE001 - collected, reported below
                failures.append(f"{case.operation.label}: {' '.join(str(e).split())[:300]}")

        run()
    assert calls >= 20 and not failures, failures[:3]
    assert server.health()["status"] == "ok"
