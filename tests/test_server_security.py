"""`qwen-mlx serve` security: loopback by default, a key for anything else, the key checked on
every API path, and SIGTERM: stop accepting, cancel, exit 0, nothing written."""

from __future__ import annotations

import base64
import re
import subprocess
import threading
import time

import httpx
import openai
import pytest
from server_helpers import Server, free_port, png_pixels, serve_command

from qwen_mlx.server.app import authorized
from qwen_mlx.server.command import ServeError, check_options

pytestmark = pytest.mark.timeout(300)
KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def server(tiny_qwen_image, cwd):
    srv = Server(tiny_qwen_image[1], "--api-key", KEY, cwd=cwd, key=KEY)
    yield srv
    srv.stop()


def test_a_non_loopback_host_needs_a_key(tiny_qwen_image):
    res = subprocess.run(
        serve_command(tiny_qwen_image[1], free_port(), "--host", "0.0.0.0"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "refusing to listen on 0.0.0.0 without --api-key" in res.stderr
    assert "Traceback" not in res.stderr and "loading" not in res.stderr  # refused before loading


@pytest.mark.parametrize(
    ("host", "key", "queue", "message"),
    [
        ("192.168.1.20", None, 4, "refusing to listen on 192.168.1.20"),
        ("::", None, 4, "refusing to listen on ::"),
        ("127.0.0.1", "short", 4, "--api-key must be at least 8 characters"),
        ("127.0.0.1", None, 0, "--max-queue must be at least 1"),
    ],
)
def test_unsafe_options_are_refused(host, key, queue, message):
    with pytest.raises(ServeError, match=re.escape(message)):
        check_options(host, 7860, key, queue)
    for ok in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_options(ok, 7860, None, 1)
    check_options("0.0.0.0", 7860, KEY, 1)


class StubWorker:
    """No model: authorised API calls answer 503 (loading), unauthorised ones 401."""

    engine, load_error, accepting, last, memory = None, None, True, None, {}


def test_the_key_is_required_on_every_api():
    from fastapi.testclient import TestClient

    from qwen_mlx.server.app import create_app

    with TestClient(create_app(StubWorker(), api_key=KEY)) as c:
        assert c.get("/").status_code == 200  # the page asks for the key itself
        assert c.get("/health").status_code == 503  # public (no model here)
        for path in ("/v1/models", "/sdapi/v1/sd-models", "/openapi.json", "/api/info"):
            res = c.get(path)
            assert res.status_code == 401, path
            assert "Bearer" in res.headers["WWW-Authenticate"]
        res = c.get("/v1/models")
        assert res.json()["error"]["code"] == "invalid_api_key"
        res = c.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer wrong-key-123"})
        assert res.status_code == 401 and "API key" in res.json()["detail"]
        res = c.post("/v1/images/generations", json={"prompt": "x"})
        assert res.status_code == 401
        ok = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 503 and "loading" in ok.json()["error"]["message"]
        basic = base64.b64encode(f"user:{KEY}".encode()).decode()
        res = c.get("/sdapi/v1/sd-models", headers={"Authorization": f"Basic {basic}"})
        assert res.status_code == 503
        assert c.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).is_success


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
