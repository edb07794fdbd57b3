"""``qwen-mlx`` with the tiny Edit models' small sizing areas (tests/tiny_edit.py), for tests
that run the CLI as a process (e.g. ``serve`` under mlx.launch): ``python small_edit_cli.py
serve ...``. At diffusers' 1024² areas the tiny models would be slow and large on a CPU."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

if __name__ == "__main__":
    from tiny_edit import TEST_CONDITION_AREA, TEST_VAE_AREA

    from qwen_mlx.cli import app
    from qwen_mlx.pipelines.edit import QwenImageEditPipeline

    QwenImageEditPipeline.vae_image_area = TEST_VAE_AREA
    QwenImageEditPipeline.condition_image_area = TEST_CONDITION_AREA
    sys.argv[0] = "qwen-mlx"
    app()
