"""`qwen-mlx serve` security: loopback by default, a key for anything else, the key checked on
every API path, and SIGTERM: stop accepting, cancel, exit 0, nothing written."""

from __future__ import annotations

import base64
import subprocess
import threading
import time

import httpx
import openai
import pytest
from helpers import convert_tiny
from server_helpers import Server, free_port, png_pixels, serve_command
from tiny_pipeline import build_checkpoint

from qwen_mlx.server.app import authorized

pytestmark = pytest.mark.timeout(300)
KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    src = build_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")[0]
    return convert_tiny(src, tmp_path_factory.mktemp("mlx") / "tiny")


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def server(model, cwd):
    srv = Server(model, "--api-key", KEY, cwd=cwd, key=KEY)
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without --api-key"),
        (["--host", "192.168.1.20"], "refusing to listen on 192.168.1.20"),
        (["--api-key", "short"], "--api-key must be at least 8 characters"),
        (["--max-queue", "0"], "--max-queue must be at least 1"),
    ],
)
def test_unsafe_options_are_refused_before_loading(model, args, message):
    res = subprocess.run(
        serve_command(model, free_port(), *args), capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "loading" not in res.stderr


def test_the_key_is_required_on_every_api(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/health").status_code == 200  # public: load balancers, scripts
        assert c.get("/").status_code == 200  # the page asks for the key itself
        res = c.get("/v1/models")
        assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"
        assert "Bearer" in res.headers["WWW-Authenticate"]
        res = c.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer wrong-key-123"})
        assert res.status_code == 401 and "API key" in res.json()["detail"]
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/api/info").status_code == 401
        ok = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        basic = base64.b64encode(f"user:{KEY}".encode()).decode()
        res = c.get("/sdapi/v1/sd-models", headers={"Authorization": f"Basic {basic}"})
        assert res.status_code == 200


def test_the_openai_client_with_the_key(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    res = client.images.generate(
        prompt="a cube", size="32x32", response_format="url", extra_body={"steps": 2}
    )
    # the image URL holds the job's random id: fetchable without the key (as OpenAI's)
    png = httpx.get(res.data[0].url, timeout=30)
    assert png.status_code == 200 and png_pixels(png.content).shape == (32, 32, 3)
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="a cube", size="32x32")


def test_authorized_forms():
    assert authorized(f"Bearer {KEY}", KEY) and authorized(f"bearer  {KEY}", KEY)
    basic = base64.b64encode(f":{KEY}".encode()).decode()
    assert authorized(f"Basic {basic}", KEY)
    for header in (None, "", KEY, f"Bearer {KEY}x", f"Token {KEY}", "Basic %%%", "Bearer "):
        assert not authorized(header, KEY)


def test_sigterm_cancels_and_exits_0(server, cwd):
    """Last in this module: SIGTERM during a long job."""
    answer = {}

    def long_job():
        with server.client() as c:
            answer["res"] = c.post(
                "/sdapi/v1/txt2img",
                json={"prompt": "long", "steps": 1000, "width": 64, "height": 64},
            )

    t = threading.Thread(target=long_job)
    t.start()
    with server.client() as c:
        deadline = time.monotonic() + 60
        while c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    start = time.monotonic()
    assert server.stop(timeout=30) == 0, server.output()
    assert time.monotonic() - start < 20
    t.join(10)
    res = answer["res"]
    assert res.status_code == 503 and "shutting down" in res.json()["detail"], res.text
    assert [p.name for p in cwd.iterdir()] == [server.log.name]  # no partial file
    assert "Traceback" not in server.log.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)
