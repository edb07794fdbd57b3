"""Precision plans: exact folding, FP16 without overflow, device auto-selection, variants."""

from __future__ import annotations

import copy
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import convert_tiny, rel_err, write_model_index
from tiny_transformer import build_transformer, save_checkpoint

from qwen_mlx.device import auto_precision
from qwen_mlx.io import load_folder
from qwen_mlx.models.transformer import QwenImageTransformer
from qwen_mlx.precision import SCALES, PrecisionPlan, make_plan
from qwen_mlx.variants import detect_variant, normalize_variant

EXACT_TOL = 1e-5  # folding multiplies by powers of two: float32 results agree to rounding
FP16_TOL = 2e-2
SHAPES = [[(1, 3, 5)]] * 2


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 15, 16, generator=g)
    enc = torch.randn(2, 7, 16, generator=g)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    return x, enc, mask, torch.tensor([0.7, 0.3])


def run(model: QwenImageTransformer, x, enc, mask, t) -> mx.array:
    out = model(
        mx.array(x.numpy()),
        mx.array(enc.numpy()),
        mx.array(mask.numpy()),
        mx.array(t.numpy()),
        SHAPES,
    )
    mx.eval(out)
    return out


def finite(x: mx.array) -> bool:
    return bool(mx.all(mx.isfinite(x)).item())


# ----------------------------------------------------------------------------- plans


def test_scale_table_by_layer():
    plan = make_plan("fp16", "qwen-image", 60)
    assert plan.layer(0).qkv_scale == 8 and plan.layer(0).qk_norm_eps == pytest.approx(1e-6 / 64)
    assert [plan.layer(i).attn_out_scale for i in (0, 43, 44, 59)] == [2, 2, 16, 16]
    assert [plan.layer(i).ffn_out_scale for i in (0, 58, 59)] == [16, 16, 256]
    assert {plan.layer(i).dtype(g) for i in (0, 59) for g in ("mod", "v", "ffn_down")} == {
        mx.float16
    }
    edit = make_plan("fp16", "qwen-image-edit", 60)
    assert (edit.layer(58).ffn_out_scale, edit.layer(59).ffn_out_scale) == (32, 512)
    plus = make_plan("fp16", "qwen-image-edit-2511", 60)
    assert (plus.layer(43).attn_out_scale, plus.layer(44).attn_out_scale) == (4, 32)
    new = make_plan("fp16", "qwen-image-2512", 60)
    assert new.layer(0).qkv_scale == 16 and new.layer(0).ffn_in_scale == 2
    # Shallower models count the late layers from the end: 18 layers -> 2 early, 16 late.
    small = make_plan("fp16", "qwen-image", 18)
    assert [small.layer(i).attn_out_scale for i in (0, 1, 2, 17)] == [2, 2, 16, 16]
    assert [small.layer(i).ffn_out_scale for i in (16, 17)] == [16, 256]


def test_named_plans():
    mixed = make_plan("mixed", "qwen-image", 4)
    layer = mixed.layer(3)
    assert not mixed.folded and mixed.outer == "float16"
    assert {g: layer.dtype(g) for g in ("qkv", "mod", "ffn_up")} == dict.fromkeys(
        ("qkv", "mod", "ffn_up"), mx.float16
    )
    assert {layer.dtype(g) for g in ("v", "attn_out", "ffn_down")} == {mx.bfloat16}
    assert make_plan("mixed", "qwen-image-2512", 4).layer(0).ffn_in_scale == 2
    assert make_plan("bf16", None, 2).storage_dtype() == "bfloat16"
    assert make_plan("fp32", None, 2).storage_dtype() == "float32"
    assert make_plan("float16", None, 2) == PrecisionPlan.uniform("float16", 2)
    assert make_plan("auto", None, 2).name == auto_precision()[0]
    with pytest.raises(ValueError, match="unknown precision"):
        make_plan("fp8", None, 2)
    plan = make_plan("fp16", "qwen-image-edit", 3)
    assert PrecisionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.same_folds(plan.with_dtype("float32"))
    assert not plan.same_folds(make_plan("fp16", "qwen-image", 3))
    assert "variant qwen-image-edit" in plan.describe() and "/512" in plan.describe()


# ----------------------------------------------------------------------------- folding


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """An 18-layer tiny model (2 early + 16 late attention layers) and its plain conversion."""
    ref = build_transformer("diffusers", num_layers=18, std=0.15)
    src = save_checkpoint(ref, tmp_path_factory.mktemp("deep"), shard_size="200KB")
    plain = convert_tiny(src, tmp_path_factory.mktemp("plain") / "out")
    model = QwenImageTransformer.from_pretrained(plain / "transformer")
    return src, plain, run(model, *inputs())


@pytest.mark.parametrize("variant", ["qwen-image", "qwen-image-edit", "qwen-image-2512"])
def test_folding_is_exact(deep, tmp_path, variant):
    """fp16-plan weights (folded, stored float32) run in float32 equal the unfolded model."""
    src, plain, expected = deep
    dst = convert_tiny(src, tmp_path / "fold", precision="fp16", variant=variant)
    config = json.loads((dst / "transformer" / "config.json").read_text())
    section = config["qwen_mlx"]
    assert section["variant"] == variant and section["dtype"] == "float32"
    assert section["precision_plan"]["name"] == "fp16" and section["folded"]
    assert PrecisionPlan.from_config(config, 18) == make_plan("fp16", variant, 18)

    folded, unfolded = load_folder(dst / "transformer"), load_folder(plain / "transformer")
    p = SCALES[variant].attn_out[1]
    np.testing.assert_allclose(
        np.array(folded["blocks.17.attn.to_v.weight"]),
        np.array(unfolded["blocks.17.attn.to_v.weight"]) / p,
    )
    np.testing.assert_array_equal(  # the output norm is not scaled
        np.array(folded["norm_out.linear.weight"]), np.array(unfolded["norm_out.linear.weight"])
    )

    f32 = make_plan("fp16", variant, 18).with_dtype("float32")
    model = QwenImageTransformer.from_pretrained(dst / "transformer", plan=f32)
    assert model.blocks[0].attn.norm_q.eps == pytest.approx(1e-6 / SCALES[variant].qkv_in ** 2)
    assert rel_err(run(model, *inputs()), expected) < EXACT_TOL
    # Folding a plain checkpoint at load time gives the same thing.
    model = QwenImageTransformer.from_pretrained(plain / "transformer", plan=f32)
    assert rel_err(run(model, *inputs()), expected) < EXACT_TOL


def test_conversion_stores_the_plan_dtypes(tmp_path):
    src = save_checkpoint(build_transformer("diffusers"), tmp_path / "src")
    fp16 = load_folder(
        convert_tiny(src, tmp_path / "a", "bfloat16", precision="fp16") / "transformer"
    )
    assert {v.dtype for v in fp16.values()} == {mx.float16}
    dst = convert_tiny(src, tmp_path / "b", "bfloat16", precision="mixed")
    mixed = load_folder(dst / "transformer")
    assert mixed["blocks.0.attn.to_q.weight"].dtype == mx.float16
    assert mixed["blocks.1.attn.add_v_proj.weight"].dtype == mx.bfloat16
    assert mixed["blocks.1.txt_mlp.down.bias"].dtype == mx.bfloat16
    assert mixed["proj_out.weight"].dtype == mx.float16
    config = json.loads((dst / "transformer" / "config.json").read_text())
    assert config["qwen_mlx"]["dtype"] == "mixed" and config["qwen_mlx"]["folded"] == []
    index = json.loads((dst / "model_index.json").read_text())
    assert index["qwen_mlx"]["precision"] == "mixed"


def test_folded_checkpoint_refuses_other_plans(tmp_path):
    src = save_checkpoint(build_transformer("diffusers"), tmp_path / "src")
    dst = convert_tiny(src, tmp_path / "fold", "bfloat16", precision="fp16") / "transformer"
    assert QwenImageTransformer.from_pretrained(dst, plan="fp16").plan.name == "fp16"
    for other in ("bf16", "mixed", "float32", make_plan("fp16", "qwen-image-2512", 2)):
        with pytest.raises(ValueError, match="folded for the 'fp16' precision plan"):
            QwenImageTransformer.from_pretrained(dst, plan=other)
    # A plain checkpoint takes any plan.
    plain = convert_tiny(src, tmp_path / "plain") / "transformer"
    for name in ("fp16", "mixed", "bf16", "float16"):
        assert QwenImageTransformer.from_pretrained(plain, plan=name).plan.name == name


# ----------------------------------------------------------------------------- overflow


def amplified_transformer() -> torch.nn.Module:
    """A tiny model whose branches overflow float16 as the released model's do: the (late)
    attention out-projections reach ~2e5, the last block's FFN down-projection ~1e6."""
    ref = build_transformer("diffusers", num_layers=3)
    with torch.no_grad():
        for block in ref.transformer_blocks:
            for proj in (block.attn.to_out[0], block.attn.to_add_out):
                proj.weight.mul_(3e3)
                proj.bias.mul_(3e3)
        last = ref.transformer_blocks[-1]
        for mlp in (last.img_mlp, last.txt_mlp):
            mlp.net[2].weight.mul_(1e4)
            mlp.net[2].bias.mul_(1e4)
    return ref


@pytest.fixture(scope="module")
def overflow(tmp_path_factory):
    ref = amplified_transformer()
    peaks: dict[str, float] = {}

    def record(name):
        def hook(module, args, out):
            peaks[name] = max(peaks.get(name, 0.0), float(out.abs().max()))

        return hook

    last = ref.transformer_blocks[-1]
    hooks = [
        last.attn.to_out[0].register_forward_hook(record("attn_out")),
        last.img_mlp.net[2].register_forward_hook(record("ffn_down")),
    ]
    x, enc, mask, t = inputs()
    with torch.no_grad():
        expected = ref(x, enc, mask, t, SHAPES).sample
    for h in hooks:
        h.remove()
    src = save_checkpoint(ref, tmp_path_factory.mktemp("amp"))
    return ref, src, expected, peaks


def test_amplified_model_really_overflows_fp16(overflow):
    ref, _, expected, peaks = overflow
    assert 1e5 < peaks["attn_out"] < 1e6 and 1e5 < peaks["ffn_down"] < 1e7, peaks
    assert np.isfinite(expected.numpy()).all()
    half = copy.deepcopy(ref).to(torch.float16)  # diffusers in plain fp16 (runs on CPU)
    x, enc, mask, t = inputs()
    with torch.no_grad():
        out = half(x.half(), enc.half(), mask.half(), t.half(), SHAPES).sample
    assert not torch.isfinite(out).all()


def test_plain_float16_overflows(overflow, tmp_path):
    _, src, _, _ = overflow
    dst = convert_tiny(src, tmp_path / "f16", "float16")
    model = QwenImageTransformer.from_pretrained(dst / "transformer")
    assert not finite(run(model, *inputs()))


@pytest.mark.parametrize("precision", ["fp16", "mixed"])
@pytest.mark.parametrize("variant", ["qwen-image", "qwen-image-2512"])
def test_scaled_plans_stay_finite(overflow, tmp_path, precision, variant):
    _, src, expected, _ = overflow
    dst = convert_tiny(src, tmp_path / "out", "bfloat16", precision=precision, variant=variant)
    model = QwenImageTransformer.from_pretrained(dst / "transformer")
    assert model.blocks[2].img_mlp.up.weight.dtype == mx.float16
    got = run(model, *inputs())
    assert finite(got)
    err = rel_err(got, expected)
    assert 1e-5 < err < FP16_TOL  # really ran in half precision, and stayed accurate


# ----------------------------------------------------------------------------- auto, variants


@pytest.mark.parametrize(
    "info,plan",
    [
        ({"architecture": "applegpu_g13g", "device_name": "Apple M1"}, "fp16"),
        ({"architecture": "applegpu_g13s", "device_name": "Apple M1 Max"}, "fp16"),
        ({"architecture": "applegpu_g14d", "device_name": "Apple M2 Ultra"}, "fp16"),
        ({"architecture": "applegpu_g15s", "device_name": "Apple M3 Pro"}, "bf16"),
        ({"architecture": "applegpu_g16s", "device_name": "Apple M4 Max"}, "bf16"),
        ({"architecture": "applegpu_g17s", "device_name": "Apple M5 Max"}, "bf16"),
        ({"device_name": "Apple M2"}, "fp16"),  # no architecture: the name decides
        ({"architecture": "x86_64", "device_name": "AMD EPYC"}, "bf16"),
        ({}, "bf16"),
    ],
)
def test_auto_precision(info, plan):
    name, reason = auto_precision(info)
    assert name == plan and reason


def test_auto_precision_here():
    name, reason = auto_precision()
    assert name in ("fp16", "bf16") and reason


def _checkpoint(root, cls="QwenImagePipeline", **config):
    write_model_index(root, ["transformer"])
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = cls
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    return root


def test_detect_variant(tmp_path):
    base = _checkpoint(tmp_path / "pytest-2512" / "src")
    assert detect_variant(base) == "qwen-image"  # dates only count in the model's own name
    assert detect_variant(base / "transformer") == "qwen-image"
    edit = _checkpoint(tmp_path / "e", "QwenImageEditPipeline")
    assert detect_variant(edit / "transformer") == "qwen-image-edit"
    plus = _checkpoint(tmp_path / "p", "QwenImageEditPlusPipeline")
    assert detect_variant(plus) == "qwen-image-edit-2509"
    zero = _checkpoint(tmp_path / "z", "QwenImageEditPlusPipeline", zero_cond_t=True)
    assert detect_variant(zero / "transformer", {"zero_cond_t": True}) == "qwen-image-edit-2511"
    named = _checkpoint(tmp_path / "Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline")
    assert detect_variant(named / "transformer") == "qwen-image-edit-2511"
    hub = tmp_path / "hub" / "models--Qwen--Qwen-Image-2512" / "snapshots" / "0a1b2c"
    hub.parent.mkdir(parents=True)
    _checkpoint(hub)
    assert detect_variant(hub / "transformer") == "qwen-image-2512"
    assert detect_variant(None, {"zero_cond_t": True}) == "qwen-image-edit-2511"
    assert detect_variant(None, {"qwen_mlx": {"variant": "qwen-image-edit"}}) == "qwen-image-edit"
    assert detect_variant(hub, override="Qwen/Qwen-Image-Edit") == "qwen-image-edit"
    assert normalize_variant("edit_2509") == "qwen-image-edit-2509"
    with pytest.raises(ValueError, match="unknown model variant"):
        normalize_variant("flux")


def test_conversion_detects_the_variant(tmp_path):
    root = tmp_path / "Qwen-Image-2512"
    src = save_checkpoint(build_transformer("diffusers"), root)
    dst = convert_tiny(src, tmp_path / "out", precision="fp16")
    config = json.loads((dst / "transformer" / "config.json").read_text())
    assert config["qwen_mlx"]["variant"] == "qwen-image-2512"
    assert config["qwen_mlx"]["precision_plan"]["layers"][0]["qkv_scale"] == 16
    # The variant is recorded for plain conversions too, so a later fp16 override uses it.
    plain = convert_tiny(src, tmp_path / "plain") / "transformer"
    assert QwenImageTransformer.from_pretrained(plain, plan="fp16").plan.variant == (
        "qwen-image-2512"
    )
