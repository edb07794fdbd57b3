"""Inputs are sacred (issue 21), library level: outputs never replace inputs, images of any bit
depth read by their range, LoRA specs / scales / values checked when they load, a hub that does
not answer fails at once, one-line warnings, an unusable cache, size wording."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen_mlx import cache, checks, hub, messages
from qwen_mlx.adaln import AdaLNCache
from qwen_mlx.image_processing import array_to_uint8, read_image, to_8bit, to_rgb
from qwen_mlx.lora import LoraError, check_lora_scale, parse_lora_spec, read_lora
from qwen_mlx.outputs import OutputError, check_not_inputs, same_file
from qwen_mlx.pipelines.img2img import as_pil, default_size

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- item 1: outputs


def test_an_output_naming_an_input_is_refused_however_it_is_spelled(tmp_path, monkeypatch):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"mine")
    (tmp_path / "link.png").symlink_to(photo)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    inputs = [("--image", Path("photo.png"))]
    for out in ("photo.png", "./photo.png", "sub/../photo.png", str(photo), "link.png"):
        with pytest.raises(OutputError, match=r"would overwrite an input image \(--image photo"):
            check_not_inputs([Path(out)], inputs)
    os.link(photo, tmp_path / "hard.png")  # another name for the same file on disk
    with pytest.raises(OutputError, match="hard.png would overwrite"):
        check_not_inputs([Path("hard.png")], inputs)
    # the input given through the link, the output as the real file
    with pytest.raises(OutputError, match="photo.png would overwrite"):
        check_not_inputs([photo], [("--mask", Path("link.png"))])
    check_not_inputs([Path("other.png"), Path("sub/photo.png")], inputs)  # other files: fine
    check_not_inputs([Path("photo.png")], [("image", None)])  # in-memory input: no path
    assert photo.read_bytes() == b"mine"


def test_same_file_survives_missing_paths_and_loops(tmp_path):
    assert same_file(tmp_path / "a.png", tmp_path / "x" / ".." / "a.png")  # neither exists
    assert not same_file(tmp_path / "a.png", tmp_path / "b.png")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert not same_file(tmp_path / "loop", tmp_path / "b.png")


# ----------------------------------------------------------------------------- item 2: images


def gradient(w: int = 40, h: int = 24, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 pixels with every level's neighbourhood (so off-by-one scaling shows)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)


def write_png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit PNG (grey 0, RGB 2, grey+alpha 4, RGBA 6) written byte by byte: Pillow cannot
    write 16-bit colour PNGs."""
    h, w = arr.shape[:2]
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[1 if arr.ndim == 2 else arr.shape[2]]
    rows = arr.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\0" + rows[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
    )
    return path


def test_16_bit_png_files_read_as_their_8_bit_twins(tmp_path):
    """Grey I;16 (Pillow used to clip it to white), RGB, RGBA and grey+alpha 16-bit PNGs; each
    value v8 stored as v8 * 257 (the exact 16-bit twin) reads back as v8."""
    for channels in (1, 3, 4, 2):
        eight = gradient(channels=channels, seed=channels)
        path = write_png16(tmp_path / f"c{channels}.png", eight.astype(np.uint16) * 257)
        got = read_image(path)
        if channels == 2:  # Pillow reads 16-bit grey+alpha as RGBA
            twin = Image.fromarray(eight, "LA").convert("RGBA")
        else:
            twin = Image.fromarray(eight)
        assert got.mode == twin.mode
        np.testing.assert_array_equal(np.asarray(got), np.asarray(twin))
        np.testing.assert_array_equal(
            np.asarray(to_rgb(Image.open(path))), np.asarray(to_rgb(twin))
        )


def test_16_bit_mask_at_40000_is_gray_not_white(tmp_path):
    """The issue's mask: left half 40000/65535 (0.61, repaint), right half 20000 (0.31, keep).
    Before the fix both halves read as 255."""
    m = np.zeros((16, 32), np.uint16)
    m[:, :16], m[:, 16:] = 40000, 20000
    got = np.asarray(as_pil(write_png16(tmp_path / "m.png", m), "mask"))
    assert got.dtype == np.uint8
    assert (got[:, :16] == round(40000 / 65535 * 255)).all() and (got[:, 16:] == 78).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I16", "I32", "F"])
def test_every_high_depth_mode_reads_as_its_8_bit_twin(mode):
    eight = gradient(channels=1)
    if mode.startswith("I;16"):
        image = Image.new(mode, (eight.shape[1], eight.shape[0]))
        image.putdata((eight.astype(np.int64) * 257).ravel().tolist())
    elif mode == "I16":  # how older Pillow hands 16-bit PNGs over: mode I, 0..65535
        image = Image.fromarray(eight.astype(np.int32) * 257)
    elif mode == "I32":  # genuine 32-bit integer data: 0..2**31-1
        image = Image.fromarray(np.round(eight / 255 * (2**31 - 1)).astype(np.int32))
    else:
        image = Image.fromarray(eight.astype(np.float32) / 255)
    assert image.mode == {"I16": "I", "I32": "I"}.get(mode, mode)
    got = to_8bit(image)
    assert got.mode == "L"
    np.testing.assert_array_equal(np.asarray(got), eight)
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.stack([eight] * 3, axis=-1))


def test_8_bit_images_pass_unchanged():
    for mode in ("L", "RGB", "RGBA", "P", "1", "LA", "CMYK"):
        image = Image.new(mode, (4, 4))
        assert to_8bit(image) is image


def test_arrays_read_by_dtype():
    eight = gradient()
    np.testing.assert_array_equal(array_to_uint8(eight), eight)
    np.testing.assert_array_equal(array_to_uint8(eight.astype(np.uint16) * 257), eight)
    np.testing.assert_array_equal(array_to_uint8(eight / 255.0), eight)
    np.testing.assert_array_equal(array_to_uint8((eight / 255.0).astype(np.float32)), eight)
    np.testing.assert_array_equal(array_to_uint8(np.array([[True, False]])), [[255, 0]])
    # a little overshoot (resampling ringing) is clipped; 0..255 floats are not 0..1: refused
    np.testing.assert_array_equal(array_to_uint8(np.array([[1.02, -0.01]])), [[255, 0]])
    with pytest.raises(ValueError, match="float pixel values from 0 to 255; float images are"):
        array_to_uint8(eight.astype(np.float32), "image")
    with pytest.raises(ValueError, match="mask holds NaN"):
        array_to_uint8(np.array([[np.nan, 0.5]]), "mask")
    with pytest.raises(ValueError, match="array of int64; give uint8"):
        array_to_uint8(eight.astype(np.int64))
    np.testing.assert_array_equal(
        np.asarray(as_pil(eight.astype(np.uint16) * 257)), np.asarray(as_pil(eight))
    )


def test_unreadable_image_files_are_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^cannot read mask /nonexistent.png: "):
        read_image("/nonexistent.png", "mask")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*bad.png: cannot identify"):
        read_image(tmp_path / "bad.png")
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"image .*f.tif holds float pixel values from 300"):
        read_image(tmp_path / "f.tif")


# ----------------------------------------------------------------------------- items 3-4: LoRAs


@pytest.fixture
def lora_file(tmp_path):
    path = tmp_path / "style.safetensors"
    a, b = mx.ones((2, 8)), mx.ones((8, 2))
    mx.save_safetensors(
        str(path),
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b,
        },
    )
    return path


def test_lora_spec_scale_and_path(lora_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_lora_spec("style.safetensors") == (Path("style.safetensors"), 1.0)
    for text, value in (("0.8", 0.8), ("-1", -1.0), (".5", 0.5), ("1e-1", 0.1), ("2.", 2.0)):
        assert parse_lora_spec(f"style.safetensors:{text}") == (Path("style.safetensors"), value)
    assert parse_lora_spec(f"{lora_file}:0.5") == (lora_file, 0.5)
    for bad in ("abc", "1_0", "nan", "inf", " 1", "0x1", "1,5", ""):
        with pytest.raises(LoraError, match="is not a number in 'style.safetensors:"):
            parse_lora_spec(f"style.safetensors:{bad}")
    # the message: the scale is named, not "file not found"
    with pytest.raises(LoraError, match=r"^LoRA scale 'abc' is not a number"):
        parse_lora_spec("style.safetensors:abc")
    with pytest.raises(LoraError, match="^LoRA file not found: missing.safetensors$"):
        parse_lora_spec("missing.safetensors:0.8")
    with pytest.raises(LoraError, match="^LoRA scale 'x' is not a number"):
        parse_lora_spec("missing.safetensors:x")  # clearly PATH:SCALE
    with pytest.raises(LoraError, match="^LoRA file not found: missing$"):
        parse_lora_spec("missing")
    # a colon inside an existing file's name belongs to the name
    odd = tmp_path / "a:b.safetensors"
    odd.write_bytes(lora_file.read_bytes())
    assert parse_lora_spec("a:b.safetensors") == (Path("a:b.safetensors"), 1.0)
    assert parse_lora_spec("a:b.safetensors:0.3") == (Path("a:b.safetensors"), 0.3)


def test_lora_scale_check():
    assert check_lora_scale(1) == 1.0 and check_lora_scale(np.float32(0.5)) == 0.5
    for bad in ("abc", "0.8", None, True, [1]):
        with pytest.raises(LoraError, match="LoRA scale must be a number, got"):
            check_lora_scale(bad)
    with pytest.raises(LoraError, match="LoRA scale for x.safetensors must be finite, got nan"):
        check_lora_scale(float("nan"), "x.safetensors")


def test_lora_holding_nan_or_inf_is_refused_when_read(lora_file, tmp_path):
    read_lora(lora_file)  # the clean file reads
    bad = tmp_path / "bad.safetensors"
    weights = dict(mx.load(str(lora_file)))
    key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    weights[key] = mx.array(np.where(np.eye(8, 2) > 0, np.inf, 1.0).astype(np.float16))
    mx.save_safetensors(str(bad), weights)
    with pytest.raises(LoraError) as err:
        read_lora(bad)
    assert str(err.value) == f"{bad}: 1 LoRA tensor(s) hold NaN or inf values: {key}"


def test_lora_stack_and_fuse_refuse_a_bad_scale(lora_file):
    from qwen_mlx.lora import LoraStack, fuse_weights

    lora = read_lora(lora_file)
    weights = {"blocks.0.attn.to_q.weight": mx.zeros((8, 8))}
    with pytest.raises(LoraError, match="LoRA scale for style.safetensors must be a number"):
        fuse_weights(weights, [(lora, "abc")])
    with pytest.raises(LoraError, match="must be a number, got 'abc'"):
        LoraStack(object()).add(lora, "abc")  # refused before the model is looked at


def test_non_finite_message_says_what_the_plan_means():
    line = messages.non_finite_message(1, 2, "float32")
    assert line == (
        "latents became non-finite (NaN/inf) at step 1/2 under the 'float32' precision plan, "
        "whose range does not overflow here: the weights or the inputs hold NaN/inf or values "
        "too large"
    )
    assert "the LoRAs or their scales" in messages.non_finite_message(1, 2, "bf16", loras=1)
    assert messages.non_finite_message(3, 4, "fp16").endswith("try precision='bf16' or 'fp32'")


# ----------------------------------------------------------------------------- item 5: the hub


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_says_why_and_an_answer_is_reachable(monkeypatch):
    monkeypatch.setattr(hub, "endpoint", lambda: f"http://127.0.0.1:{closed_port()}")
    assert "refused" in hub.unreachable("org/name").lower()
    with socket.socket() as server:  # anything that answers HTTP counts as reachable
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setattr(hub, "endpoint", lambda: f"http://127.0.0.1:{port}")
        import threading

        def answer():
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

        t = threading.Thread(target=answer)
        t.start()
        assert hub.unreachable("org/name") is None
        t.join()


HUB_SCRIPT = """
import sys
from qwen_mlx.cli import app
sys.argv = ["qwen-mlx", *sys.argv[1:]]
app()
"""


def run_cli(tmp_path, *args, **env):
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    full = dict(keep, PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), **env)
    return subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, *args],
        env=full, capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    "command", [["info", "org/name"], ["generate", "--model", "org/name", "-p", "x"]]
)
def test_hub_that_does_not_answer_fails_in_one_line_without_retries(tmp_path, command):
    """The issue's `info org/name` offline took 24 s of "Retrying in 8s" lines: now one probe,
    one line, and the way to run from the cache. HF_ENDPOINT is a closed loopback port."""
    proc = run_cli(tmp_path, *command, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Retrying" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: org/name: no such folder, and cannot")
    assert (
        "cannot be reached" in proc.stderr
        and "HF_HUB_OFFLINE=1 uses the Hugging Face cache" in (proc.stderr)
    )


def test_offline_without_a_cached_copy_says_so(tmp_path):
    proc = run_cli(tmp_path, "info", "org/name", HF_HUB_OFFLINE="1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: org/name: no such folder, and not in the Hugging Face cache "
        "(HF_HUB_OFFLINE=1 is set: the hub is not asked)"
    )


# ----------------------------------------------------------------------------- item 6: warnings


def test_warnings_print_one_line(capsys):
    old = warnings.showwarning
    try:
        messages.install_warning_format()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("prompt too long:\n  300 tokens", stacklevel=1)
            warnings.warn("old API", DeprecationWarning, stacklevel=1)
    finally:
        warnings.showwarning = old
    assert capsys.readouterr().err == (
        "warning: prompt too long: 300 tokens\nwarning: DeprecationWarning: old API\n"
    )


# ----------------------------------------------------------------------------- item 7: the cache


def test_cache_root_and_an_unusable_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, "")
    assert cache.cache_root() == Path("~/.cache/qwen-mlx").expanduser()  # empty = unset
    monkeypatch.setenv(cache.ENV, str(tmp_path / "c"))
    assert cache.cache_folder("x", "y") == tmp_path / "c" / "x" / "y"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(cache.ENV, str(tmp_path / "file"))
    with pytest.raises(cache.CacheError) as err:
        cache.cache_folder("org--name")
    assert str(err.value) == (
        f"QWEN_MLX_CACHE={tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a folder; "
        "point QWEN_MLX_CACHE at a writable folder"
    )


def test_adaln_cache_in_a_file_runs_from_memory_and_warns_once(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(cache.ENV, str(tmp_path / "file"))
    store = AdaLNCache()
    table = ["step 0", "step 1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.get("k1", lambda: table) == table
        assert store.get("k2", lambda: table) == table
    assert [str(w.message) for w in caught] == [
        f"adaLN cache: cannot write in {tmp_path / 'file' / 'adaln'} ({tmp_path / 'file'} is a "
        f"file, not a folder; QWEN_MLX_CACHE={tmp_path / 'file'}); running without the cache"
    ]


# ----------------------------------------------------------------------------- item 8: sizes


def test_size_messages_name_the_side():
    with pytest.raises(ValueError) as err:
        default_size(Image.new("RGB", (10000, 10)), 16)
    assert str(err.value) == (
        "the image is 10000x10: its height 10 is below the minimum of 16 pixels"
    )
    with pytest.raises(ValueError, match="its width 4 and height 8 are below the minimum of 16"):
        checks.check_image_size(4, 8)
    with pytest.raises(ValueError, match="its width 9000 is above the largest output side"):
        checks.check_image_size(9000, 64, max_side=8192)
    assert default_size(Image.new("RGB", (40, 33)), 16) == (32, 32)


def test_save_png_never_replaces_an_input(tmp_path):
    from qwen_mlx.png import save_png

    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(photo)
    before = photo.read_bytes()
    params = {"prompt": "x", "steps": 1, "cfg": 1, "seed": 1, "width": 8, "height": 8,
              "model": "m", "precision": "p", "version": "v"}  # fmt: skip
    with pytest.raises(OutputError, match=r"would overwrite an input image \(image "):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "." / "photo.png", params, True,
                 inputs=[("image", photo)])  # fmt: skip
    assert photo.read_bytes() == before
    assert save_png(
        Image.new("RGB", (8, 8)), tmp_path / "out.png", params, inputs=[("image", photo)]
    )
