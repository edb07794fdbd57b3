"""Qwen2.5-VL vision tower and image preprocessing against transformers, on tiny random models.

The tower (tests/tiny_edit.py: 4 blocks, windows of 4x4 patches, full attention in block 2) is
saved by transformers, converted by our converter and compared with
``Qwen2_5_VisionTransformerPretrainedModel`` on grids with whole, partial and single windows,
and several images in one call. The processor is compared with transformers' PIL
``Qwen2VLImageProcessor`` (``Qwen2VLImageProcessorPil``) on odd sizes and image modes.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import convert_tiny, rel_err, write_model_index
from PIL import Image
from tiny_edit import PROCESSOR, VISION, build_edit_text_encoder
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwen_mlx.errors import CheckpointError
from qwen_mlx.image_processing import ImageProcessor, smart_resize
from qwen_mlx.io import load_folder, read_json
from qwen_mlx.models.vision import VisionConfig, VisionTransformer, window_index

TOL = 1e-4  # float32 against float32: only accumulation order differs

# (t, h, w) patch grids: 4x4 merged = 2x2 whole windows; 3x5 merged = partial edge windows;
# 1x1 merged = a single window (no padding); 7x2 merged = a tall strip.
GRIDS = [(1, 8, 8), (1, 6, 10), (1, 2, 2), (1, 14, 4)]


@pytest.fixture(scope="module")
def ref_model():
    return build_edit_text_encoder()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, ref_model):
    root = tmp_path_factory.mktemp("vision") / "src"
    ref_model.save_pretrained(root / "text_encoder", max_shard_size="200KB")
    write_model_index(root, ["text_encoder"])
    return convert_tiny(root, root.parent / "converted")


@pytest.fixture(scope="module")
def tower(converted) -> VisionTransformer:
    folder = converted / "text_encoder"
    tower = VisionTransformer.from_weights(read_json(folder / "config.json"), load_folder(folder))
    assert tower.dtype == mx.float32
    return tower


def _ref(ref_model, pixels: np.ndarray, grids: list) -> torch.Tensor:
    with torch.no_grad():
        out = ref_model.model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grids))
    return out.pooler_output


def _pixels(grids, seed=0) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, 3 * 2 * 14 * 14)).astype(np.float32)


def test_config_from_released_keys():
    """The released config.json's vision_config (transformers 4 keys, e.g. in_chans)."""
    released = {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
        "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2, "model_type": "qwen2_5_vl",
    }  # fmt: skip
    cfg = VisionConfig.from_dict({"vision_config": released})
    assert (cfg.depth, cfg.hidden_size, cfg.head_dim, cfg.patch_dim) == (32, 1280, 80, 1176)
    assert cfg.fullatt_block_indexes == (7, 15, 23, 31) and cfg.rope_theta == 10000.0
    with pytest.raises(ValueError, match="hidden_act"):
        VisionConfig.from_dict(dict(released, hidden_act="gelu"))


def test_window_index_matches_transformers():
    from transformers.vision_utils import get_vision_window_index

    cfg = VisionConfig.from_dict(VISION)
    for grid in GRIDS + [(1, 16, 16), (1, 74, 74)]:
        order, sizes = window_index(grid[1], grid[2], cfg)
        ref_order, ref_cu = get_vision_window_index(torch.tensor([grid]), 2, 56, 14)
        np.testing.assert_array_equal(order, ref_order.numpy())
        np.testing.assert_array_equal(np.cumsum([0] + sizes), ref_cu.numpy())


@pytest.mark.parametrize("grid", GRIDS)
def test_tower_matches_transformers(tower, ref_model, grid):
    pixels = _pixels([grid])
    got = tower(mx.array(pixels), [grid])
    ref = _ref(ref_model, pixels, [grid])
    assert got.shape == (grid[1] * grid[2] // 4, VISION["out_hidden_size"])
    assert rel_err(got, ref) < TOL


def test_tower_several_images(tower, ref_model):
    """Images packed in one call (transformers' cu_seqlens), features concatenated in order."""
    grids = [(1, 6, 10), (1, 8, 8), (1, 2, 4)]
    pixels = _pixels(grids, seed=3)
    got = tower(mx.array(pixels), grids)
    assert rel_err(got, _ref(ref_model, pixels, grids)) < TOL


def test_tower_all_full_and_all_window(tmp_path):
    """Every block windowed, and every block full (window larger than the image)."""
    for vision in (dict(fullatt_block_indexes=[]), dict(window_size=112 * 4)):
        ref = build_edit_text_encoder(seed=1, **vision)
        weights = {
            f"visual.{k}": mx.array(v.numpy()) for k, v in ref.model.visual.state_dict().items()
        }
        ours = VisionTransformer.from_weights(dict(VISION, **vision), weights)
        grid = (1, 10, 6)
        pixels = _pixels([grid], seed=5)
        assert rel_err(ours(mx.array(pixels), [grid]), _ref(ref, pixels, [grid])) < TOL


def test_tower_rejects_bad_input(tower):
    with pytest.raises(ValueError, match="patch rows"):
        tower(mx.zeros((10, 1176)), [(1, 4, 4)])
    with pytest.raises(ValueError, match="still images"):
        tower(mx.zeros((32, 1176)), [(2, 4, 4)])
    with pytest.raises(CheckpointError, match="no vision tower weights"):
        VisionTransformer.from_weights(VISION, {"language_model.norm.weight": mx.zeros(3)})


# --- preprocessing -------------------------------------------------------------------------


def _image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    data = rng.integers(0, 256, size=(h, w, bands), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if bands == 1 else data, mode=mode)


@pytest.mark.parametrize(
    "size,mode",
    [((100, 70), "RGB"), ((37, 211), "RGB"), ((9, 13), "RGB"), ((300, 300), "RGBA"),
     ((64, 90), "L"), ((45, 45), "LA"), ((56, 112), "RGB")],
)  # fmt: skip
def test_preprocessing_matches_transformers(size, mode):
    """Bit-identical pixel values and grids: upscaled below min_pixels, downscaled above
    max_pixels, exact multiples, alpha composited on white, grayscale."""
    config = {
        k: v for k, v in PROCESSOR.items() if not k.endswith("_type") and k != "processor_class"
    }
    ref_proc = Qwen2VLImageProcessorPil(**config)
    ours = ImageProcessor.from_config(PROCESSOR)
    images = [_image(*size, mode=mode), _image(size[1], size[0], mode=mode, seed=1)]
    ref = ref_proc(images=images, return_tensors="np")
    pixels, grids = ours(images)
    np.testing.assert_array_equal(grids, ref["image_grid_thw"])
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, ref["pixel_values"])


def test_preprocessing_released_config():
    """Released limits (min 3136, max 12845056): a 1024x1024 image becomes 1036x1036 (74x74)."""
    ours = ImageProcessor.from_config(
        {
            "min_pixels": 3136,
            "max_pixels": 12845056,
            "size": {"shortest_edge": 1, "longest_edge": 2},
        }
    )
    assert ours.target_size(1024, 1024) == (1036, 1036)
    assert ours.target_size(384, 384) == (392, 392)
    assert smart_resize(1024, 1024, 28, 3136, 12845056) == (1036, 1036)
    # size alone (transformers 5's own save format)
    sized = ImageProcessor.from_config({"size": {"shortest_edge": 100, "longest_edge": 5000}})
    assert (sized.min_pixels, sized.max_pixels) == (100, 5000)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)
