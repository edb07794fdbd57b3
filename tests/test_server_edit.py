"""`qwen-mlx serve` on an Edit-2511 checkpoint: /v1/images/edits with several images gives the
pixels and metadata of `qwen-mlx edit`, Edit's rules are 4xx, and the page offers the upload.

The server runs in this process (uvicorn in a thread, a free loopback port) so the tiny models'
sizing areas can be shrunk as in tests/test_edit_cli.py.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import openai
import pytest
from helpers import convert_tiny
from PIL import Image
from server_helpers import InProcessServer, png_metadata, png_pixels
from tiny_edit import TEST_CONDITION_AREA, TEST_VAE_AREA, build_edit_checkpoint
from typer.testing import CliRunner

from qwen_mlx.cli import app as cli_app
from qwen_mlx.pipelines.edit import QwenImageEditPipeline

pytestmark = pytest.mark.timeout(300)
CHROMIUM = os.environ.get("QWEN_MLX_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    src, _ = build_edit_checkpoint(root / "src", "plus", zero_cond_t=True)
    return convert_tiny(src, root / "mlx")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = []
    for name, (w, h) in (("cat.png", (150, 100)), ("hat.png", (60, 90))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def server(model):
    from qwen_mlx.server.app import create_app
    from qwen_mlx.server.engine import Engine
    from qwen_mlx.server.jobs import Worker

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(QwenImageEditPipeline, "vae_image_area", TEST_VAE_AREA)
        mp.setattr(QwenImageEditPipeline, "condition_image_area", TEST_CONDITION_AREA)
        worker = Worker(lambda: Engine.load(str(model)), max_queue=2).start()
        worker.ready.wait(120)
        assert worker.engine is not None, worker.load_error
        srv = InProcessServer(create_app(worker), worker)
        yield srv
        srv.stop()


def test_edits_match_the_cli(server, model, inputs, tmp_path):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    res = client.images.edit(
        image=[(p.name, p.read_bytes(), "image/png") for p in inputs],
        prompt="give it a hat",
        extra_body={"seed": 3, "steps": 2, "cfg": 2.5},
    )
    served = base64.b64decode(res.data[0].b64_json)
    out = tmp_path / "cli.png"
    flags = [a for p in inputs for a in ("--image", str(p))]
    cli = CliRunner().invoke(
        cli_app,
        ["edit", "--model", str(model), *flags, "--prompt", "give it a hat", "--steps", "2",
         "--seed", "3", "--cfg", "2.5", "-o", str(out)],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    np.testing.assert_array_equal(png_pixels(served), png_pixels(out.read_bytes()))
    meta, cli_meta = png_metadata(served), png_metadata(out.read_bytes())
    # the CLI records its first input's path, the server the uploaded file's name
    assert meta.pop("image") == Path(cli_meta.pop("image")).name == "cat.png"
    assert meta == cli_meta
    assert meta["flavour"] == "edit-2511" and [i["file"] for i in meta["images"]] == [
        "cat.png",
        "hat.png",
    ]


def test_edit_rules_are_4xx(server, inputs):
    png = inputs[0].read_bytes()
    with server.client() as c:
        res = c.post(
            "/v1/images/edits",
            data={"prompt": "x"},
            files=[("image[]", (f"{i}.png", png)) for i in range(4)],
        )
        assert res.status_code == 400 and "at most 3 image(s)" in res.json()["error"]["message"]
        res = c.post("/v1/images/edits", data={"prompt": "x"}, files={"image": png, "mask": png})
        assert res.status_code == 400 and "no mask" in res.json()["error"]["message"]
        res = c.post("/v1/images/generations", json={"prompt": "x"})
        assert res.status_code == 400 and "Edit model" in res.json()["error"]["message"]
        info = c.get("/api/info").json()
        assert (info["kind"], info["max_input_images"], info["default_steps"]) == ("edit", 3, 40)


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")
def test_the_page_uploads_images_to_edit(server, inputs):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(server.url)
            page.wait_for_selector("#image-row", state="visible")
            page.set_input_files("#image", [str(p) for p in inputs])
            page.fill("#prompt", "give it a hat")
            page.fill("#steps", "2")
            page.fill("#seed", "3")
            page.click("#generate")
            page.wait_for_selector("#gallery figure img")
            assert "seed 3" in page.inner_text("#gallery figcaption")
        finally:
            browser.close()


def test_an_edit_model_warms_up_too(model):
    """``serve`` warms an Edit model up like a text-to-image one: a 1-step edit of a small grey
    image at the smallest size loads the weights, so the first request loads nothing."""
    from qwen_mlx.server.engine import Engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(QwenImageEditPipeline, "vae_image_area", TEST_VAE_AREA)
        mp.setattr(QwenImageEditPipeline, "condition_image_area", TEST_CONDITION_AREA)
        engine = Engine.load(str(model))
        assert engine.pipe.components.loaded() == []
        engine.warm_up()
    assert {"transformer", "vae"} <= set(engine.pipe.components.loaded())
