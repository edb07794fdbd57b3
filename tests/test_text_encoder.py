"""Qwen2.5-VL text encoder: parity with transformers' hidden states and diffusers' encode_prompt.

A tiny random ``Qwen2_5_VLForConditionalGeneration`` (hidden 32, 3 layers, 4 heads on 2 KV heads,
mrope_section [2, 1, 1]) with Qwen's real BPE vocabulary (tests/tiny_tokenizer.py), converted
through the real converter, float32 end to end.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from helpers import convert_tiny, rel_err, write_model_index
from safetensors.torch import save_file
from tiny_tokenizer import build_tokenizer
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from qwen_mlx.convert import ConversionError, ConvertOptions
from qwen_mlx.convert.text_encoder import convert_config, convert_weights
from qwen_mlx.models.text_encoder import PROMPT_TEMPLATE, QwenTextEncoder, TextEncoderConfig
from qwen_mlx.tokenizer import QwenTokenizer

TOL = 1e-4
TEXT = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    vocab_size=152064,
)
ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 1, 1]}

LONG_EN = (
    "A sprawling night market in a rain-soaked alley, paper lanterns in red and gold, steam "
    "rising from a noodle stall, a vendor in a blue apron handing a bowl to a child in a yellow "
    "raincoat, neon signs reflected in puddles, 35mm film photograph, shallow depth of field."
)
ZH = "一只戴着墨镜的柴犬坐在海边的沙滩椅上，背后是夕阳和椰子树，油画风格。"
MIXED = 'A poster with the title "通义千问" in bold calligraphy, 3 cats, 12:30 PM\n\tsoft light'


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer", real=True)


@pytest.fixture(scope="session")
def ref_model() -> Qwen2_5_VLForConditionalGeneration:
    cfg = Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_parameters=dict(ROPE)),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            num_heads=2,
            out_hidden_size=32,
            intermediate_size=16,
            fullatt_block_indexes=[0],
        ),
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        image_token_id=151655,
        video_token_id=151656,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.2 * noise if "norm" in name or "ln_q" in name else 0.3 * noise)
    return model


@pytest.fixture(scope="session")
def hf_tok(tok_dir) -> Qwen2Tokenizer:
    return Qwen2Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="session")
def source(tmp_path_factory, ref_model, tok_dir) -> Path:
    """The released layout: transformers' save_pretrained (legacy weight names, nested config)."""
    root = tmp_path_factory.mktemp("ckpt") / "qwen-image-tiny"
    ref_model.save_pretrained(root / "text_encoder")
    shutil.copytree(tok_dir, root / "tokenizer")
    write_model_index(root, ["text_encoder", "tokenizer"])
    return root


@pytest.fixture(scope="session")
def converted(source) -> Path:
    return convert_tiny(source, source.parent / "converted")


@pytest.fixture(scope="session")
def ours(converted) -> QwenTextEncoder:
    return QwenTextEncoder.from_pretrained(converted / "text_encoder")


@pytest.fixture(scope="session")
def pipe(ref_model, hf_tok) -> QwenImagePipeline:
    return QwenImagePipeline(
        scheduler=None, vae=None, text_encoder=ref_model, tokenizer=hf_tok, transformer=None
    )


def _assert_same_mask(ours_mask, ref_mask) -> None:
    if ref_mask is None:
        assert ours_mask is None
    else:
        assert ours_mask is not None
        np.testing.assert_array_equal(np.array(ours_mask), ref_mask.numpy())


def _ref_hidden(ref_model, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        out = ref_model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            output_hidden_states=True,
        )
    return out.hidden_states[-1]


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_ids_match_transformers(tok_dir, hf_tok):
    ours = QwenTokenizer.from_folder(tok_dir)
    texts = [
        PROMPT_TEMPLATE.format(LONG_EN),
        PROMPT_TEMPLATE.format(ZH),
        PROMPT_TEMPLATE.format(""),
        MIXED,
        "<|vision_start|><|image_pad|><|vision_end|>Picture 1: 🐱 café   naïve\r\n  x",
        "don't STOP 1234567 ÅÅ  ",
    ]
    ref = hf_tok(texts)["input_ids"]
    assert ours.encode(texts) == ref
    assert ref[0][:3] == [151644, 8948, 198]  # <|im_start|> "system" "\n": the real Qwen ids
    # A tokenizer.json folder (what transformers 5 saves) loads to the same ids.
    saved = tok_dir.parent / "saved"
    hf_tok.save_pretrained(saved)
    assert (saved / "tokenizer.json").is_file()
    assert QwenTokenizer.from_folder(saved).encode(texts) == ref
    for side in ("right", "left"):
        hf_tok.padding_side = side
        try:
            want = hf_tok(texts, max_length=40, padding=True, truncation=True, return_tensors="np")
        finally:
            hf_tok.padding_side = "right"
        got = QwenTokenizer(ours.tokenizer, padding_side=side)(texts, max_length=40)
        np.testing.assert_array_equal(got.input_ids, want["input_ids"])
        np.testing.assert_array_equal(got.attention_mask, want["attention_mask"])


# --- language model --------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_hidden_states_match_transformers(ours, ref_model, side):
    tok = QwenTokenizer(ours.tokenizer.tokenizer, padding_side=side)
    batch = tok([PROMPT_TEMPLATE.format(p) for p in (LONG_EN, ZH, "")])
    assert batch.attention_mask.min() == 0
    got = ours(mx.array(batch.input_ids), mx.array(batch.attention_mask))
    ref = _ref_hidden(ref_model, batch.input_ids, batch.attention_mask)
    valid = batch.attention_mask.astype(bool)
    assert bool(mx.isfinite(got).all().item())
    assert rel_err(mx.array(np.array(got)[valid]), ref[torch.from_numpy(valid)]) < TOL


def test_multimodal_rope_positions_match_transformers(ours, ref_model):
    """General (3, B, T) positions: temporal / height / width rows that differ (Edit's images)."""
    rng = np.random.default_rng(1)
    B, T = 2, 24
    ids = rng.integers(0, 151643, size=(B, T))
    pos = np.stack([np.arange(T) * 0 + 3, np.arange(T) // 4, np.arange(T) % 4 + 2])
    pos = np.broadcast_to(pos[:, None], (3, B, T)).copy()
    pos[:, 1] += 5
    with torch.no_grad():
        ref = ref_model.model(
            input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(pos)
        ).last_hidden_state
    got = ours(mx.array(ids), None, mx.array(pos))
    assert rel_err(got, ref) < TOL
    embeds = ours.model.embed_tokens(mx.array(ids))
    assert rel_err(ours(None, None, mx.array(pos), input_embeddings=embeds), ref) < TOL
    # And the text-only default: the same position on all three rows.
    with torch.no_grad():
        ref = ref_model.model(input_ids=torch.from_numpy(ids)).last_hidden_state
    assert rel_err(ours(mx.array(ids)), ref) < TOL


# --- prompt encoding -------------------------------------------------------------------------

CASES = {
    "mixed_lengths": ([LONG_EN, ZH, "a cat", "", MIXED], 512, False),
    "single": ([ZH], 512, False),
    "same_length": (["a red apple", "a red apple"], 512, False),
    "clipped_mixed": ([LONG_EN, "a cat"], 16, True),
    "clipped_all": ([LONG_EN, ZH], 16, True),
    "tokenizer_limit": ([" ".join([LONG_EN] * 20), "a cat"], 2048, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_encode_matches_diffusers(ours, pipe, case):
    prompts, msl, truncated = CASES[case]
    with torch.no_grad():
        ref, ref_mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=msl)
    if truncated:
        with pytest.warns(UserWarning, match=r"token\(s\) dropped"):
            got, mask = ours.encode(prompts, max_sequence_length=msl)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got, mask = ours.encode(prompts, max_sequence_length=msl)
    assert got.dtype == mx.float32
    assert got.shape == tuple(ref.shape)
    _assert_same_mask(mask, ref_mask)
    assert rel_err(got, ref) < TOL
    if mask is not None:  # padding is exact zeros
        assert not np.array(got)[np.array(mask) == 0].any()
    if case == "tokenizer_limit":
        assert got.shape[1] == QwenTextEncoder.tokenizer_max_length


def test_bfloat16_close_to_transformers_bfloat16(converted, ref_model, hf_tok, pipe):
    """bf16 is noisy on a random model (transformers' own bf16 is ~8% off its fp32 here), so
    compare against transformers in bf16, and our bf16 error against transformers' bf16 error."""
    prompts = [LONG_EN, ZH]
    bf16_model = copy.deepcopy(ref_model).to(torch.bfloat16)
    pipe16 = QwenImagePipeline(
        scheduler=None, vae=None, text_encoder=bf16_model, tokenizer=hf_tok, transformer=None
    )
    with torch.no_grad():
        ref32, _ = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=512)
        ref16, _ = pipe16.encode_prompt(prompts, device="cpu", max_sequence_length=512)
    enc = QwenTextEncoder.from_pretrained(converted / "text_encoder", dtype="bfloat16")
    assert enc.dtype == mx.bfloat16
    got, _ = enc.encode(prompts)
    assert got.dtype == mx.float32
    assert rel_err(got, ref16) < 0.1
    assert rel_err(got, ref32) < 2 * rel_err(ref16, ref32)


def test_free(converted):
    from qwen_mlx.io import load_folder

    folder = converted / "text_encoder"
    config = json.loads((folder / "config.json").read_text())
    enc = QwenTextEncoder.from_weights(config, load_folder(folder), converted / "tokenizer")
    enc.encode(["a cat"])
    enc.free()
    with pytest.raises(RuntimeError, match="freed"):
        enc.encode(["a cat"])


# --- conversion ------------------------------------------------------------------------------


def test_converted_layout(source, converted):
    index = json.loads((converted / "text_encoder" / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert not any(n.startswith("lm_head") for n in names)
    assert {n.split(".")[0] for n in names} == {"language_model", "visual"}
    assert "language_model.layers.2.self_attn.q_proj.bias" in names
    src = mx.load(str(source / "text_encoder" / "model.safetensors"))
    dst = {}
    for shard in sorted(set(index["weight_map"].values())):
        dst.update(mx.load(str(converted / "text_encoder" / shard)))
    visual = [k for k in src if k.startswith("visual.")]
    assert visual and all(mx.array_equal(dst[k], src[k]).item() for k in visual)
    config = json.loads((converted / "text_encoder" / "config.json").read_text())
    assert config["qwen_mlx"]["dropped"] == ["lm_head"]


def test_transformers5_names_and_flat_config(tmp_path, ref_model, tok_dir, ours):
    """In-memory transformers 5 names (model.language_model.*, model.visual.*) + a flat config."""
    root = tmp_path / "ckpt"
    te = root / "text_encoder"
    te.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in ref_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    assert any(k.startswith("model.visual.") for k in state)
    save_file(state, str(te / "model.safetensors"), metadata={"format": "pt"})
    flat = dict(TEXT, model_type="qwen2_5_vl", hidden_act="silu", tie_word_embeddings=False)
    flat["rope_theta"] = ROPE["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": ROPE["mrope_section"]}
    flat["vision_config"] = ref_model.config.vision_config.to_dict()
    (te / "config.json").write_text(json.dumps(flat))
    shutil.copytree(tok_dir, root / "tokenizer")
    write_model_index(root, ["text_encoder", "tokenizer"])

    assert TextEncoderConfig.from_dict(flat) == ours.model.config
    prompts = [LONG_EN, "a cat"]
    want, want_mask = ours.encode(prompts)
    for enc in (
        QwenTextEncoder.from_pretrained(
            convert_tiny(root, tmp_path / "converted") / "text_encoder"
        ),
        QwenTextEncoder.from_pretrained(
            root / "text_encoder", dtype="float32"
        ),  # unconverted, in memory
    ):
        got, mask = enc.encode(prompts)
        assert rel_err(got, want) == 0.0
        np.testing.assert_array_equal(np.array(mask), np.array(want_mask))


def test_convert_weights_rules():
    w = mx.zeros((2,))
    opts = ConvertOptions(dtype="float16")
    legacy = {
        "model.layers.0.mlp.up_proj.weight": w,
        "model.norm.weight": w,
        "visual.blocks.0.attn.qkv.weight": w,
        "lm_head.weight": w,
    }
    new = {
        "model.language_model.layers.0.mlp.up_proj.weight": w,
        "model.language_model.norm.weight": w,
        "model.visual.blocks.0.attn.qkv.weight": w,
        "lm_head.weight": w,
    }
    want = {
        "language_model.layers.0.mlp.up_proj.weight",
        "language_model.norm.weight",
        "visual.blocks.0.attn.qkv.weight",
    }
    for weights in (legacy, new):
        out = convert_weights(weights, {}, opts)
        assert set(out) == want
        assert all(v.dtype == mx.float16 for v in out.values())
    with pytest.raises(ConversionError):
        convert_weights({"something.else": w}, {}, opts)
    assert convert_config({"model_type": "qwen2_5_vl"}, opts)["qwen_mlx"]["folded"] == []
