import os
import sys
from pathlib import Path

import pytest

# tests/ helpers (helpers.py, tiny builders) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _qwen_mlx_cache(tmp_path_factory):
    """Caches (adaLN tables, hub conversions) go to a temporary folder, never the user's."""
    old = os.environ.get("QWEN_MLX_CACHE")
    os.environ["QWEN_MLX_CACHE"] = str(tmp_path_factory.mktemp("qwen-mlx-cache"))
    yield
    if old is None:
        os.environ.pop("QWEN_MLX_CACHE", None)
    else:
        os.environ["QWEN_MLX_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory):
    """(diffusers-layout source, converted float32 folder) of the tiny Qwen-Image checkpoint,
    built once per session for tests that only need a working model."""
    from helpers import convert_tiny
    from tiny_pipeline import build_checkpoint

    source = build_checkpoint(tmp_path_factory.mktemp("hf") / "qwen-image-tiny")[0]
    return source, convert_tiny(source, tmp_path_factory.mktemp("mlx") / "qwen-image-tiny")


@pytest.fixture(scope="session")
def tiny_4head_ckpt(tmp_path_factory):
    """The tiny Qwen-Image checkpoint (converted, float32) with a 4-head transformer: 2 and 4
    processes divide its heads (tensor parallel). Shared by the distributed tests."""
    import shutil

    from helpers import convert_tiny
    from tiny_pipeline import TEXT_HIDDEN, build_checkpoint
    from tiny_transformer import build_transformer

    root = tmp_path_factory.mktemp("dist-pipe")
    src, _ = build_checkpoint(root / "src")
    shutil.rmtree(src / "transformer")
    model = build_transformer(
        "diffusers", std=0.2, joint_attention_dim=TEXT_HIDDEN, num_attention_heads=4
    )
    model.save_pretrained(src / "transformer", max_shard_size="20KB")
    return convert_tiny(src, root / "f32")


@pytest.fixture(scope="session")
def tiny_edit_4head_ckpt(tmp_path_factory):
    """A tiny Edit-2509/2511 checkpoint (converted, float32) with a 4-head transformer: 2 and 4
    processes divide its heads. Shared by the distributed tests."""
    from helpers import convert_tiny
    from tiny_edit import build_edit_checkpoint

    root = tmp_path_factory.mktemp("dist-edit")
    src, _ = build_edit_checkpoint(root / "src", "plus", num_attention_heads=4)
    return convert_tiny(src, root / "mlx")


@pytest.fixture(scope="session")
def fullsize_checkpoint(tmp_path_factory):
    """The released Qwen-Image checkpoint's layout at full size, header-only: every shard is its
    safetensors header followed by a hole (no disk used). For what reads headers only (memory
    estimates, ``info``, ``--dry-run``); see tests/fullsize.py."""
    from fullsize import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("fullsize") / "Qwen-Image", holes=True)


@pytest.fixture(scope="session")
def tiny_server(tiny_qwen_image, tmp_path_factory):
    """`qwen-mlx serve` on the tiny model, on a free loopback port (tests/server_helpers.py):
    queue 4, at most 1000 steps, 1 MiB bodies, and a 100 MiB memory limit (64x64 fits, 256x256
    does not). Shared by the server tests; stopped (SIGTERM, exit 0) at the end."""
    from server_helpers import Server

    srv = Server(
        tiny_qwen_image[1],
        "--max-queue", "4", "--max-steps", "1000", "--max-body-mb", "1",
        cwd=tmp_path_factory.mktemp("serve"),
        env={"QWEN_MLX_MEMORY_LIMIT": "100MiB"},
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0, srv.output()
