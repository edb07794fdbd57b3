"""Prompt embeddings with images against diffusers' Edit pipelines' ``encode_prompt``.

A tiny Qwen2.5-VL (tests/tiny_edit.py) saved in the released layout with a ``processor/`` folder,
converted by our converter. The reference is diffusers 0.42.1's ``QwenImageEditPipeline`` and
``QwenImageEditPlusPipeline.encode_prompt`` with the text encoder wrapped by ``with_mrope``
(3D image positions, see there); one test shows the wrapper is what makes them agree.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from helpers import convert_tiny, rel_err, write_model_index
from PIL import Image
from tiny_edit import build_edit_text_encoder, reference_processor, with_mrope, write_processor
from tiny_tokenizer import build_tokenizer

from qwen_mlx.models.edit_prompt import QwenEditTextEncoder, rope_index

TOL = 1e-4  # float32 against float32: only accumulation order differs

PROMPTS = ["Make the cat wear a small red hat", " ", "把招牌上的字改成“通义千问”，保持其他不变"]


def _image(w: int, h: int, seed: int) -> Image.Image:
    data = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(data)


IMAGES = [_image(130, 90, 0), _image(40, 120, 1), _image(64, 64, 2)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit") / "src"
    build_edit_text_encoder().save_pretrained(root / "text_encoder", max_shard_size="200KB")
    build_tokenizer(root / "tokenizer")
    write_processor(root / "processor")
    write_model_index(root, ["text_encoder", "tokenizer"])
    return root


@pytest.fixture(scope="module")
def converted(source):
    return convert_tiny(source, source.parent / "converted")


def _reference(source, plus: bool, mrope: bool = True):
    te = build_edit_text_encoder()
    if mrope:
        te = with_mrope(te)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return cls(
        scheduler=None, vae=None, text_encoder=te, transformer=None,
        tokenizer=reference_processor(source / "processor", source / "tokenizer").tokenizer,
        processor=reference_processor(source / "processor", source / "tokenizer"),
    )  # fmt: skip


def _ref_embeds(pipe, prompt: str, images):
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt, image=images, device="cpu")
    return embeds, mask


def _check(got_embeds, got_mask, row: int, ref_embeds, ref_mask):
    """Row ``row`` of our batch against diffusers' single-prompt encoding."""
    n = ref_embeds.shape[1]
    got = got_embeds[row : row + 1]
    assert rel_err(got[:, :n], ref_embeds) < TOL
    assert not np.any(np.array(got[:, n:]))  # right padding is zeros
    valid = np.ones(got.shape[1], dtype=np.int32)
    valid[n:] = 0
    expect = None if ref_mask is None else ref_mask.numpy()
    assert expect is None or expect.all()  # diffusers: all ones -> None
    mask = np.ones(got_embeds.shape[:2], np.int32) if got_mask is None else np.array(got_mask)
    np.testing.assert_array_equal(mask[row], valid)


def test_edit_matches_diffusers(source, converted):
    ours = QwenEditTextEncoder.from_pretrained(converted / "text_encoder", plus=False)
    ref = _reference(source, plus=False)
    image = IMAGES[0]
    embeds, mask = ours.encode(PROMPTS, [image])
    assert embeds.dtype == mx.float32 and mask is not None
    for row, prompt in enumerate(PROMPTS):
        _check(embeds, mask, row, *_ref_embeds(ref, prompt, image))


def test_edit_plus_two_images_matches_diffusers(source, converted):
    """Two images of different sizes and aspects: "Picture 1: ... Picture 2: ..."."""
    ours = QwenEditTextEncoder.from_pretrained(converted / "text_encoder", plus=True)
    ref = _reference(source, plus=True)
    images = IMAGES[:2]
    feats = ours.encode_images(images)
    assert feats.tokens == [15, 4] and feats.grids.tolist() == [[1, 6, 10], [1, 8, 2]]
    embeds, mask = ours.encode(PROMPTS, feats)
    for row, prompt in enumerate(PROMPTS):
        _check(embeds, mask, row, *_ref_embeds(ref, prompt, images))
    # One and three images.
    for images in ([IMAGES[2]], IMAGES):
        embeds, mask = ours.encode(PROMPTS[:1], images)
        _check(embeds, mask, 0, *_ref_embeds(ref, PROMPTS[0], images))


def test_unconverted_checkpoint_loads_the_same(source, converted):
    a = QwenEditTextEncoder.from_pretrained(converted / "text_encoder", plus=True)
    b = QwenEditTextEncoder.from_pretrained(source / "text_encoder", dtype="float32", plus=True)
    ea, _ = a.encode(PROMPTS[0], IMAGES[:2])
    eb, _ = b.encode(PROMPTS[0], IMAGES[:2])
    np.testing.assert_array_equal(np.array(ea), np.array(eb))


def test_3d_positions_are_what_differs_from_unpatched_diffusers(source, converted):
    """diffusers 0.42.1 + transformers 5 gives image tokens 1D positions; the wrapper restores
    3D ones. Guard that the comparison above is not vacuous: without it they must differ."""
    ours = QwenEditTextEncoder.from_pretrained(converted / "text_encoder", plus=False)
    ref_embeds, _ = _ref_embeds(_reference(source, plus=False, mrope=False), PROMPTS[0], IMAGES[0])
    embeds, _ = ours.encode(PROMPTS[0], IMAGES[0])
    assert rel_err(embeds, ref_embeds) > 1e-2


def test_rope_index_matches_transformers(source):
    """Positions for text, two images (non-square merged grids) and text in between."""
    te = build_edit_text_encoder()
    grids = np.array([[1, 6, 8], [1, 10, 4]])
    pad = 151655
    ids = np.array([1, 2] + [pad] * 12 + [3, 4, 5] + [pad] * 10 + [6])
    got, used = rope_index(ids, pad, grids, 2)
    ref, _ = te.model.get_rope_index(
        torch.from_numpy(ids)[None],
        mm_token_type_ids=torch.from_numpy((ids == pad).astype(np.int64))[None],
        image_grid_thw=torch.from_numpy(grids),
    )
    assert used == 2
    np.testing.assert_array_equal(got, ref[:, 0].numpy())
    with pytest.raises(ValueError, match="image 0 has 12 tokens, its grid needs 10"):
        rope_index(ids, pad, grids[::-1], 2)
    with pytest.raises(ValueError, match="more image placeholders"):
        rope_index(ids, pad, grids[:1], 2)


def test_bad_inputs(converted):
    ours = QwenEditTextEncoder.from_pretrained(converted / "text_encoder", plus=False)
    with pytest.raises(ValueError, match="exactly one image"):
        ours.encode("x", IMAGES[:2])
    with pytest.raises(ValueError, match="image_pad"):
        ours.encode("x <|image_pad|>", IMAGES[:1])
    ours.free()
    with pytest.raises(RuntimeError, match="freed"):
        ours.encode("x", IMAGES[:1])
