"""quantize.QuantizedLinear: on the CPU a bf16/fp16 layer runs MLX's float32 quantized matmul.

MLX's CPU kernel in a half dtype accumulates in that dtype (and is 10-30x slower); the float32
kernel on the same packed weights, rounded once to the layer's dtype, is what Metal's kernels
(float32 accumulation) give up to rounding. Checked against a float64 reference."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from qwen_mlx.quantize import QuantizedLinear, linear_from_weights, quantize_model


def layer_weights(dtype, bits: int, seed: int = 0) -> dict[str, mx.array]:
    k = mx.random.key(seed)
    w = (mx.random.normal((256, 1024), key=k) * 0.05).astype(dtype)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    bias = (mx.random.normal((256,), key=mx.random.key(seed + 1)) * 0.1).astype(dtype)
    return {"weight": wq, "scales": scales, "biases": biases, "bias": bias}


def reference(weights: dict[str, mx.array], x: mx.array, bits: int) -> np.ndarray:
    f32 = mx.float32  # the packed values with their scales and biases, exactly
    s, b = weights["scales"].astype(f32), weights["biases"].astype(f32)
    w = mx.dequantize(weights["weight"], s, b, group_size=64, bits=bits)
    w64 = np.array(w.astype(mx.float32), dtype=np.float64)
    b64 = np.array(weights["bias"].astype(mx.float32), dtype=np.float64)
    return np.array(x.astype(mx.float32), dtype=np.float64) @ w64.T + b64


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_half_layers_use_the_float32_kernel(dtype, bits):
    weights = layer_weights(dtype, bits)
    layer = linear_from_weights(weights, 64)
    assert type(layer) is QuantizedLinear
    x = (mx.random.normal((3, 1024), key=mx.random.key(5))).astype(dtype)
    with mx.stream(mx.cpu):
        y = layer(x)
        plain = nn.QuantizedLinear.__call__(layer, x)  # MLX's own half-precision kernel
        f32 = mx.quantized_matmul(
            x.astype(mx.float32),
            weights["weight"],
            weights["scales"].astype(mx.float32),
            weights["biases"].astype(mx.float32),
            transpose=True,
            group_size=64,
            bits=bits,
        ) + weights["bias"].astype(mx.float32)
    assert y.dtype == dtype and y.shape == (3, 256)
    # exactly the float32 kernel rounded once to the layer's dtype
    assert mx.array_equal(y, f32.astype(dtype)).item()
    ref = reference(weights, x, bits)
    ours = np.abs(np.array(y.astype(mx.float32)) - ref).max()
    theirs = np.abs(np.array(plain.astype(mx.float32)) - ref).max()
    # within one rounding of the output: half an ulp of the largest |y| (bf16 has 8 bits)
    assert ours <= np.abs(ref).max() * 2**-8 * 1.01, ours
    assert ours <= theirs  # never worse than the half-precision kernel


def test_float32_layers_and_loaded_models_unchanged():
    weights = layer_weights(mx.float32, 8)
    layer = linear_from_weights(weights, 64)
    x = mx.random.normal((2, 1024), key=mx.random.key(1))
    assert mx.array_equal(layer(x), nn.QuantizedLinear.__call__(layer, x)).item()
    model = nn.Sequential(nn.Linear(1024, 256))
    flat = {f"layers.0.{k}": v for k, v in layer_weights(mx.bfloat16, 4).items()}
    quantize_model(model, flat, 64)
    assert type(model.layers[0]) is QuantizedLinear and model.layers[0].bits == 4
