"""ControlNet inputs: the guidance window, the conditions' layout, the Canny preprocessor."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qwen_mlx import control


def test_keep_is_diffusers_rule():
    # diffusers: 1 - float(i / N < start or (i + 1) / N > end)
    assert control.keep(4, 0.0, 1.0) == [1.0] * 4
    assert control.keep(4, 0.25, 0.75) == [0.0, 1.0, 1.0, 0.0]
    assert control.keep(5, 0.0, 0.5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert control.keep(3, 0.5, 1.0) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("start,end", [(0.5, 0.5), (0.8, 0.2), (-0.1, 1.0), (0.0, 1.5)])
def test_window_refused(start, end):
    with pytest.raises(ValueError, match="control_guidance"):
        control.check_window(start, end)


def test_inpaint_condition_layout():
    """[masked-image latents, 1 - mask] per latent pixel, packed 2x2 channel-major."""
    seen = []

    def encode(x):  # a stand-in VAE: 4x down-sampling, z = 2 channels
        seen.append(np.array(x))
        return x[:, ::4, ::4, :2] * 10

    image = Image.fromarray(np.full((16, 16, 3), 255, np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255  # repaint the right half
    cond = control.inpaint_condition(encode, image, Image.fromarray(mask), 16, 16, 4)
    assert cond.shape == (1, 4, 12)  # 2x2 tokens, (2 latents + 1 mask) x 4
    assert (seen[0][0, :, 8:] == -1).all() and (seen[0][0, :, :8] == 1).all()
    c = np.array(cond).reshape(2, 2, 3, 2, 2)  # token row, token col, channel, dy, dx
    assert (c[:, 0, 2] == 1).all() and (c[:, 1, 2] == 0).all()  # kept left, repainted right
    assert (c[:, 0, :2] == 10).all() and (c[:, 1, :2] == -10).all()
    with pytest.raises(ValueError, match="no white"):
        control.inpaint_condition(encode, image, Image.new("L", (16, 16)), 16, 16, 4)


def test_canny_edges():
    pytest.importorskip("cv2")
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[8:24, 8:24] = 255
    edges = np.array(control.canny(Image.fromarray(arr)))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[16, 16].max() == 0 and edges[2, 2].max() == 0  # flat areas
    assert edges[8:24, 7:9].max() == 255  # the square's left side
    high = np.array(control.canny(Image.fromarray(arr // 8), low=200, high=250))
    assert high.max() == 0  # a weak step under the thresholds gives no edge
    with pytest.raises(ValueError, match="unknown control preprocessor"):
        control.preprocess("depth", Image.fromarray(arr))


def test_union_condition_packs_the_encoded_image():
    image = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    cond = control.union_condition(lambda x: x[:, ::2, ::2, :], image, 8, 8)
    assert cond.shape == (1, 4, 12) and cond.dtype == mx.float32
