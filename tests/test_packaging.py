"""The wheel installs one top-level package, and the converter only as qwen_mlx.convert."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_one_top_level_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("qwen_mlx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {n.split("/")[0] for n in names} == {"qwen_mlx", dist_info}
    assert "qwen_mlx/convert/convert.py" in names and "qwen_mlx/io.py" in names
    assert not any(n.startswith("convert/") for n in names)


def test_converter_is_one_module():
    """Only qwen_mlx.convert exists: a top-level `convert` would load a second copy."""
    import qwen_mlx.convert as conv
    from qwen_mlx.convert.errors import ConversionError

    assert conv.ConversionError is ConversionError
    assert Path(conv.__file__).parent == ROOT / "convert"
    assert "convert" not in sys.modules


def test_runtime_does_not_import_the_converter():
    """Loading a converted checkpoint needs no converter: the import runs one way."""
    code = (
        "import sys; import qwen_mlx.pipelines.txt2img, qwen_mlx.cli, qwen_mlx.models.transformer, "
        "qwen_mlx.models.vae, qwen_mlx.models.text_encoder; "
        "print(any(m.startswith('qwen_mlx.convert') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
