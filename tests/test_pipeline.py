"""End to end against diffusers' QwenImagePipeline on a tiny checkpoint, plus loading paths."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import convert_tiny
from tiny_pipeline import build_checkpoint

from qwen_mlx.pipelines.txt2img import (
    NonFiniteError,
    QwenImagePipeline,
    pack_latents,
    unpack_latents,
)

# float32 end to end; the image is in [0, 1]. Errors from summation order in 3 models and up to
# 6 Euler steps stay ~1e-5; 2e-3 (half a uint8 level) is the bar for "the same image".
IMAGE_TOL = 2e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root, ref = build_checkpoint(tmp_path_factory.mktemp("hf") / "qwen-image-tiny")
    dst = convert_tiny(root, tmp_path_factory.mktemp("mlx") / "qwen-image-tiny")
    return root, dst, ref


@pytest.fixture(scope="module")
def pipe(tiny):
    return QwenImagePipeline.from_pretrained(tiny[1])


def noise(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    L = (height // 8) * (width // 8)  # tiny VAE: 4x spatial, then 2x2 patches
    return torch.randn(batch, L, 16, generator=torch.Generator().manual_seed(seed))


def reference(ref, latents, **kw) -> np.ndarray:
    with torch.no_grad():
        return ref(latents=latents, output_type="np", **kw).images


@pytest.mark.parametrize(
    "prompts,negative,cfg,height,width,steps",
    [
        (["a red cube"], None, 1.0, 32, 48, 4),  # no CFG, non-square
        (["a red cube"], " ", 4.0, 48, 32, 5),  # true CFG
        (["a red cube on a table", "一只猫"], "blurry", 3.0, 32, 32, 6),  # batch of 2, CFG
        (["tiny", "a much longer prompt with many more words in it"], None, 1.0, 40, 24, 4),
    ],
)
def test_matches_diffusers(tiny, pipe, prompts, negative, cfg, height, width, steps):
    _, _, ref = tiny
    latents = noise(len(prompts), height, width)
    kw = dict(height=height, width=width, num_inference_steps=steps, true_cfg_scale=cfg)
    expected = reference(ref, latents, prompt=prompts, negative_prompt=negative, **kw)
    got = pipe(prompts, negative_prompt=negative, latents=latents.numpy(), output_type="np", **kw)
    assert got.shape == expected.shape == (len(prompts), height, width, 3)
    assert np.abs(got - expected).max() <= IMAGE_TOL
    assert got.std() > 0.01  # a real image, not a constant


def test_batched_cfg_equals_separate_calls(pipe):
    """The one padded cond+uncond call gives what two unpadded calls give."""
    model = pipe.transformer
    cond, cmask = pipe.encode_prompt(["a long prompt about a red cube on a wooden table"])
    neg, nmask = pipe.encode_prompt([" "])
    assert cond.shape[1] != neg.shape[1] and cmask is None and nmask is None
    from qwen_mlx.pipelines.txt2img import pad_embeddings

    embeds, mask = pad_embeddings([cond, neg], [cmask, nmask])
    x = mx.random.normal((1, 24, 16), key=mx.random.key(0))
    mod = pipe.modulation_table(mx.array([0.7]))[0]  # the adaLN cache: one row for the batch
    batched = model(mx.concatenate([x, x]), embeds, mask, None, [[(1, 4, 6)]] * 2, modulation=mod)
    a = model(x, cond, None, None, [[(1, 4, 6)]], modulation=mod)
    b = model(x, neg, None, None, [[(1, 4, 6)]], modulation=mod)
    np.testing.assert_allclose(np.array(batched[:1]), np.array(a), atol=1e-5)
    np.testing.assert_allclose(np.array(batched[1:]), np.array(b), atol=1e-5)


def test_uncond_pass_skipped_without_cfg(pipe, monkeypatch):
    seen = []
    model = pipe.transformer
    original = type(model).__call__

    def spy(self, x, *a, **k):
        seen.append(x.shape[0])
        return original(self, x, *a, **k)

    monkeypatch.setattr(type(model), "__call__", spy)
    pipe("a cube", negative_prompt=" ", true_cfg_scale=1.0, height=32, width=32,
         num_inference_steps=2, seed=0, output_type="np")  # fmt: skip
    pipe("a cube", negative_prompt=None, true_cfg_scale=4.0, height=32, width=32,
         num_inference_steps=2, seed=0, output_type="np")  # fmt: skip
    assert seen == [1, 1, 1, 1]
    seen.clear()
    pipe("a cube", negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32,
         num_inference_steps=2, seed=0, output_type="np")  # fmt: skip
    assert seen == [2, 2]  # one batched call per step


def test_encode_prompt_matches_diffusers(tiny, pipe):
    _, _, ref = tiny
    prompts = ["hello", "a longer prompt here, with punctuation!"]
    with torch.no_grad():
        e_ref, m_ref = ref.encode_prompt(prompts, device="cpu", max_sequence_length=512)
    e, m = pipe.encode_prompt(prompts)
    np.testing.assert_allclose(np.array(e), e_ref.numpy(), atol=1e-4 * float(e_ref.abs().max()))
    np.testing.assert_array_equal(np.array(m), m_ref.numpy())


def test_seed_is_reproducible_and_pil_output(pipe):
    kw = dict(height=32, width=32, num_inference_steps=2, true_cfg_scale=1.0)
    a = pipe("a cube", seed=7, **kw)
    b = pipe("a cube", seed=7, **kw)
    c = pipe("a cube", seed=8, **kw)
    assert a[0].size == (32, 32) and a[0].mode == "RGB"
    assert np.array_equal(np.array(a[0]), np.array(b[0]))
    assert not np.array_equal(np.array(a[0]), np.array(c[0]))
    # image i of a batch seeded s is the image of seed s+i alone
    batch = pipe("a cube", seed=7, num_images_per_prompt=2, output_type="np", **kw)
    alone = pipe("a cube", seed=8, output_type="np", **kw)
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)


def test_callback_and_timings(pipe):
    calls = []
    pipe("x", seed=1, height=32, width=32, num_inference_steps=3, true_cfg_scale=1.0,
         callback=lambda i, n, lat: calls.append((i, n, lat.shape)))  # fmt: skip
    assert calls == [(1, 3, (1, 16, 16)), (2, 3, (1, 16, 16)), (3, 3, (1, 16, 16))]
    assert set(pipe.timings) == {"encode", "denoise", "decode"}


def test_non_finite_latents_stop_with_the_step(pipe):
    huge = np.full((1, 16, 16), 3e38, dtype=np.float32)  # finite, but overflows in the model
    with pytest.raises(NonFiniteError, match="step 1/2"):
        pipe("x", latents=huge, height=32, width=32, num_inference_steps=2, true_cfg_scale=1.0)
    bad = np.full((1, 16, 16), np.nan, dtype=np.float32)  # refused before any step
    with pytest.raises(NonFiniteError, match="latents is non-finite"):
        pipe("x", latents=bad, height=32, width=32, num_inference_steps=2, true_cfg_scale=1.0)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="not a multiple of 8; use 32 or 40"):
        pipe("x", height=36, width=32)
    with pytest.raises(ValueError, match="at least 1"):
        pipe("x", height=32, width=32, num_inference_steps=0)
    with pytest.raises(ValueError, match="latents must be packed"):
        pipe("x", height=32, width=32, latents=np.zeros((1, 3, 16), np.float32))


def test_unconverted_folder_loads_in_memory(tiny):
    root, dst, _ = tiny
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    pipe = QwenImagePipeline.from_pretrained(root, dtype="float32")
    assert not pipe.source.converted
    kw = dict(height=32, width=32, num_inference_steps=2, true_cfg_scale=1.0, seed=3)
    a = pipe("a cube", output_type="np", **kw)
    b = QwenImagePipeline.from_pretrained(dst)("a cube", output_type="np", **kw)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written


def test_hub_repo_id_downloads_then_converts_once(tiny, tmp_path, monkeypatch):
    root, _, _ = tiny
    import huggingface_hub

    import qwen_mlx.convert.convert as core

    calls = {"download": [], "convert": 0}

    def fake_download(repo_id, revision=None, allow_patterns=None, cache_dir=None):
        calls["download"].append((repo_id, tuple(allow_patterns)))
        return str(root)

    real_convert = core.convert_checkpoint

    def counting_convert(*a, **k):
        calls["convert"] += 1
        return real_convert(*a, **k)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr("qwen_mlx.convert.convert_checkpoint", counting_convert)
    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("qwen_mlx.hub.unreachable", lambda *a, **k: None)  # the hub "answers"
    p1 = QwenImagePipeline.from_pretrained("Qwen/Qwen-Image", dtype="float32")
    p2 = QwenImagePipeline.from_pretrained("Qwen/Qwen-Image", dtype="float32")
    assert calls["convert"] == 1 and len(calls["download"]) == 2
    assert "transformer/*" in calls["download"][0][1]
    assert p1.source.root == p2.source.root and p1.source.root.is_relative_to(tmp_path / "cache")
    assert p1.source.converted


def test_missing_model_and_component(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder: .*nope"):
        QwenImagePipeline.from_pretrained(tmp_path / "nope" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        QwenImagePipeline.from_pretrained(tmp_path / "empty")


def test_pack_roundtrip_matches_diffusers_layout():
    from diffusers import QwenImagePipeline as Ref

    z = torch.randn(2, 4, 6, 8)
    packed = Ref._pack_latents(z, 2, 4, 6, 8)
    ours = pack_latents(mx.array(z.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_array_equal(np.array(ours), packed.numpy())
    back = unpack_latents(ours, 6, 8)
    np.testing.assert_array_equal(np.array(back), z.permute(0, 2, 3, 1).numpy())


def test_prompt_embeds_sample_many_times(tiny, pipe):
    """Encode once, sample with embeddings: the same image as from the text."""
    kw = dict(height=32, width=32, num_inference_steps=2, true_cfg_scale=3.0, output_type="np")
    embeds, mask = pipe.encode_prompt(["a red cube", "一只猫"])
    neg, neg_mask = pipe.encode_prompt([" ", " "])
    from_text = pipe(["a red cube", "一只猫"], negative_prompt=" ", seed=4, **kw)
    from_embeds = pipe(
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_embeds_mask=neg_mask,
        seed=4,
        **kw,
    )
    np.testing.assert_allclose(from_embeds, from_text, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        pipe("x", prompt_embeds=embeds, **kw)
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        pipe(prompt_embeds=embeds[..., :3], **kw)


def test_prompt_cache_matches_batched_encoding(tiny, pipe):
    """Prompts cached one by one give diffusers' batch semantics (padding, mask None)."""
    fresh = QwenImagePipeline.from_pretrained(tiny[1])
    batch = fresh.text_encoder.encode(["tiny", "a much longer prompt with many words"])
    fresh.encode_prompt("tiny")  # cached alone first
    got = fresh.encode_prompt(["tiny", "a much longer prompt with many words"])
    np.testing.assert_allclose(np.array(got[0]), np.array(batch[0]), atol=1e-6)
    np.testing.assert_array_equal(np.array(got[1]), np.array(batch[1]))
    assert fresh.encode_prompt(["tiny"])[1] is None
