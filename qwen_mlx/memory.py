"""Will a generation fit in this machine's memory? Estimated before anything is loaded.

On a Mac, running past memory does not crash: the machine swaps until it is unusable. So the
peak is estimated first, from the checkpoint's safetensors headers (no tensor is read) and the
request, and compared with what the machine has:

    peak = max over stages of (weights held during the stage + that stage's activations)

Stages and what they hold (``STAGES``): prompt encoding holds the text encoder's language model
(the vision tower stays on disk), denoising the transformer, decoding the VAE plus the
transformer unless ``low_memory`` frees it first. Weight bytes are what each tensor will occupy
once loaded: its stored size, or its size in the dtype a precision plan or an in-memory
conversion gives it, or ``quant_bits`` bits per weight (+ a scale and a bias per group) for
weights quantized on load, layer by layer as the 4/8-bit plan gives them
(``qwen_mlx.quantize``: some layers stay float or at 8 bits). With the adaLN cache
(``adaln_cache``) the transformer's modulation weights are never loaded; ``text_encoder_bits``
quantizes the language model. Activation terms are fitted to measurements
(``scripts/measure_memory.py``, ``scripts/bench_memory.py``) and rounded up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from qwen_mlx.errors import QwenMLXError, RequestError
from qwen_mlx.io import DTYPE_BYTES, TensorInfo, folder_tensors

GiB = 2**30
DTYPE_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
COMPONENTS = ("text_encoder", "transformer", "vae")
STAGES: dict[str, tuple[str, ...]] = {
    "encode": ("text_encoder",),
    "denoise": ("transformer", "controlnet"),
    "decode": ("vae", "transformer", "controlnet"),  # low_memory frees both first
}
# Activation factors measured by scripts/measure_memory.py on a CPU (where convolutions unfold
# their inputs, so they are upper bounds for Metal), rounded up; see the closing note.
TRANSFORMER_BYTES_PER_TOKEN_UNIT = {4: 104, 2: 72}  # per token x inner_dim, by compute dtype
VAE_BYTES_PER_PIXEL_UNIT = 120  # per output pixel x base_dim in float32 (x dtype size / 4)
TEXT_BYTES_PER_TOKEN_UNIT = 40  # per prompt token x hidden size (from the layer widths)
TEMPLATE_TOKENS = 34  # the prompt template's tokens (dropped after encoding)
MEMORY_ENV = "QWEN_MLX_MEMORY_LIMIT"  # e.g. "24GiB": a budget instead of the machine's size
# Quantized pipelines decode in tiles of this many latent pixels (512x512 output per tile): one
# tile's activations bound the decoder's (scripts/bench_memory.py measures them).
LEAN_DECODE_TILE = 64
# The MLX buffer cache keeps freed buffers for reuse; bound it so it cannot grow to a second
# copy of the activations on a small machine.
CACHE_LIMIT_MAX = 2 * GiB


def cache_limit(memory: int | None = None) -> int:
    """The MLX buffer-cache limit the pipeline sets: 1/16 of the device's memory, at most
    2 GiB (1 GiB on a 16 GB Mac)."""
    if memory is None:
        from qwen_mlx.device import memory_size

        memory = memory_size() or 16 * GiB
    return int(min(CACHE_LIMIT_MAX, max(memory // 16, 256 * 2**20)))


@dataclass(frozen=True)
class Request:
    """What a generation asks for, as far as memory is concerned."""

    width: int = 1024
    height: int = 1024
    batch: int = 1  # images per transformer call
    cfg: bool = True  # true CFG doubles the transformer batch
    max_sequence_length: int = 512
    low_memory: bool = False
    precision: str | None = None  # plan override: fp32, bf16, fp16, mixed or a dtype name
    quant_bits: int | None = None  # transformer weights quantized to this many bits on load
    group_size: int = 64  # quantization group (one scale and one bias per group)
    vae_tile: int | None = 128  # VAE decode tile side in latent pixels (None: untiled)
    adaln_cache: bool = False  # modulation precomputed: its weights are never loaded
    text_encoder_bits: int | None = None  # language model quantized on load to this many bits
    controlnet_weights: int = 0  # a ControlNet's bytes once loaded (Components prices it)
    controlnet_activations: int = 0  # its residuals, held through the transformer's forward
    # one process of an mlx.launch job (qwen_mlx.distributed): "cfg" computes one CFG branch
    # (half the denoising batch); "tensor" holds 1/processes of the split transformer weights
    # (its activations are counted whole: an upper bound); "seeds" is one process's plan
    split: str | None = None
    processes: int = 1
    # images the VAE encodes, (width, height): img2img/inpaint's input at the output size,
    # Edit's references at their own; Edit's reference latents also join every denoising
    # step's sequence (reference_tokens)
    encode_sizes: tuple[tuple[int, int], ...] = ()
    reference_tokens: int = 0


@dataclass
class Estimate:
    weights: dict[str, int]  # bytes per component, as loaded
    activations: dict[str, int]  # bytes per stage
    request: Request
    stages: dict[str, int] = field(default_factory=dict)  # peak bytes per stage

    def __post_init__(self) -> None:
        for stage, held in STAGES.items():
            if stage == "decode" and self.request.low_memory:
                held = ("vae",)
            self.stages[stage] = sum(self.weights.get(c, 0) for c in held) + self.activations.get(
                stage, 0
            )

    @property
    def peak(self) -> int:
        return max(self.stages.values(), default=0)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.get)

    def describe(self) -> str:
        stage = self.peak_stage
        held = [c for c in STAGES[stage] if c in self.weights]
        if stage == "decode" and self.request.low_memory:
            held = ["vae"]
        weights = sum(self.weights[c] for c in held)
        r = self.request
        each = f" per process (--parallel {r.split}, {r.processes} processes)" if r.split else ""
        return (
            f"{gib(self.peak)}{each} while {STAGE_VERBS[stage]} ({' + '.join(held)} weights "
            f"{gib(weights)}, activations {gib(self.activations.get(stage, 0))})"
        )


STAGE_VERBS = {"encode": "encoding the prompt", "denoise": "denoising", "decode": "decoding"}


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


# ----------------------------------------------------------------------------- the machine


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+(?:e\d+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise RequestError(f"cannot read a memory size from {text!r} (e.g. 24GiB, 16G, 8e9)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def machine_memory() -> tuple[int, str]:
    """(bytes the pipeline may use, where that figure comes from): ``$QWEN_MLX_MEMORY_LIMIT``,
    else Metal's recommended working set (what stays resident on a Mac without swapping), else
    the device's or the host's memory."""
    if os.environ.get(MEMORY_ENV):
        return parse_bytes(os.environ[MEMORY_ENV]), f"${MEMORY_ENV}"
    from qwen_mlx.device import _device_info, memory_size

    info = _device_info()
    if info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"]), "Metal's recommended working set"
    size = memory_size(info)
    return (size, "this machine's memory") if size else (1 << 62, "unknown: not checked")


# ----------------------------------------------------------------------------- weights


def loaded_tensors(tensors: dict[str, TensorInfo], component: str) -> dict[str, TensorInfo]:
    """The tensors of ``component`` that generation loads: the text encoder's vision tower and
    lm_head stay on disk."""
    if component == "text_encoder":
        return {k: v for k, v in tensors.items() if "visual" not in k and "lm_head" not in k}
    return tensors


def local_tensors(root: str | Path) -> dict[str, dict[str, TensorInfo]]:
    """{component: {name: TensorInfo}} of a checkpoint folder, from its headers only."""
    return {c: folder_tensors(Path(root) / c) for c in COMPONENTS if (Path(root) / c).is_dir()}


def quantizable(name: str, info: TensorInfo, group_size: int) -> bool:
    """MLX's default quantization predicate: Linear/Embedding weights whose rows split into
    whole groups."""
    return name.endswith(".weight") and len(info.shape) == 2 and info.shape[-1] % group_size == 0


def weight_bytes(
    tensors: dict[str, TensorInfo],
    dtype_of=None,
    quant_bits: int | None = None,
    group_size: int = 64,
    bits_of=None,
) -> int:
    """Bytes of ``tensors`` once loaded. ``dtype_of(name)`` gives a float tensor's dtype size in
    memory (None: as stored); ``quant_bits`` quantizes eligible weights (scale and bias per
    group in 2 bytes each), or ``bits_of(name, info)`` says per weight (None: float); integer
    tensors (already quantized) count as stored."""
    total = 0
    for name, info in tensors.items():
        bits = quant_bits
        if bits_of is not None and info.dtype in FLOAT_DTYPES and name.endswith(".weight"):
            bits = bits_of(name, info)
        if info.dtype not in FLOAT_DTYPES:
            total += info.nbytes
        elif bits and quantizable(name, info, group_size):
            total += info.size * bits // 8 + info.size // group_size * 4
        else:
            size = dtype_of(name) if dtype_of is not None else None
            total += info.size * (size or DTYPE_BYTES[info.dtype])
    return total


def _dtype_rule(component: str, config: dict, request: Request, load_dtype: str | None):
    """dtype_of(name) for one component, or None (as stored)."""
    from .precision import component_dtype, make_plan, plan_dtype

    if request.precision and component == "transformer":
        plan = make_plan(request.precision, None, int(config.get("num_layers", 60)))
        return lambda name: plan_dtype(plan, re.sub(r"^transformer_blocks\.", "blocks.", name)).size
    if request.precision:
        dtype = component_dtype(request.precision, component)
        if dtype:
            return lambda _name: DTYPE_SIZE[dtype]
    if load_dtype:  # an unconverted folder is converted in memory to this dtype
        return lambda _name: DTYPE_SIZE[load_dtype]
    return None


# ----------------------------------------------------------------------------- activations


def transformer_activations(inner: int, heads: int, batch: int, tokens: int, plan: str) -> int:
    """One denoising step: streams, q/k/v and MLP hidden states per token x hidden unit; on a
    CPU attention scores are materialised too (Metal's fused attention does not)."""
    size = 4 if plan in ("fp32", "float32") else 2
    total = batch * tokens * inner * TRANSFORMER_BYTES_PER_TOKEN_UNIT[size]
    if not _on_gpu():
        total += batch * heads * tokens * tokens * 4
    return total


def vae_activations(
    base_dim: int, height: int, width: int, dtype_size: int, tile: int | None, scale: int = 8
) -> int:
    """One decode: the full-resolution feature maps dominate; tiles (``tile`` latent pixels a
    side, plus their overlap) bound them."""
    if tile:
        # A tile is ``tile`` latent pixels a side, its overlap included (vae.tile_spans); one
        # tile's activations bound the decode: 64-pixel tiles measured 2.05 GiB in float32
        # (scripts/bench_memory.py), under this formula's 2.8 GiB.
        side = tile * scale
        height, width = min(height, side), min(width, side)
    return height * width * base_dim * VAE_BYTES_PER_PIXEL_UNIT * dtype_size // 4


def _on_gpu() -> bool:
    try:
        import mlx.core as mx

        return mx.default_device() == mx.gpu
    except Exception:  # noqa: BLE001
        return False


# ----------------------------------------------------------------------------- the estimate


def estimate(
    tensors: dict[str, dict[str, TensorInfo]],
    request: Request,
    configs: dict[str, dict],
    load_dtype: str | None = None,
) -> Estimate:
    """The peak of one generation with ``request``.

    ``tensors``: {component: its tensors} (``local_tensors``, or headers fetched from the hub);
    ``configs``: each component's config.json; ``load_dtype``: the dtype an unconverted
    checkpoint is converted to in memory (None for a converted one)."""
    weights = {}
    rename = _renamer(load_dtype)
    n = request.processes if request.split == "tensor" else 1
    for comp in COMPONENTS:
        if comp not in tensors:
            continue
        rule = _dtype_rule(comp, configs.get(comp, {}), request, load_dtype)
        loaded = loaded_tensors(tensors[comp], comp)
        bits_of = None
        if comp == "transformer":
            loaded, bits_of = _transformer_plan(loaded, configs.get(comp, {}), request, load_dtype)
        elif comp == "text_encoder" and request.text_encoder_bits:
            bits_of = _text_encoder_bits(request)
        if comp == "transformer" and n > 1:  # this process's slices (distributed.weight_axis)
            from qwen_mlx.distributed import weight_axis

            part = {k: v for k, v in loaded.items() if weight_axis(rename(k)) is not None}
            whole = {k: v for k, v in loaded.items() if k not in part}
            weights[comp] = (
                weight_bytes(whole, rule, None, request.group_size, bits_of)
                + weight_bytes(part, rule, None, request.group_size, bits_of) // n
            )
            continue
        weights[comp] = weight_bytes(loaded, rule, None, request.group_size, bits_of)
    t = configs.get("transformer", {})
    heads = int(t.get("num_attention_heads", 24))
    inner = heads * int(t.get("attention_head_dim", 128))
    vae = configs.get("vae", {})
    scale = 2 ** len(vae.get("temperal_downsample", [False, True, True]))
    tokens = (request.height // scale // 2) * (request.width // scale // 2)
    text_tokens = request.max_sequence_length
    plan = request.precision or _stored_plan(t)
    te = configs.get("text_encoder", {})
    te = te.get("text_config") or te
    vae_size = 4 if plan in ("fp32", "float32", "fp16", "mixed") else 2  # the plans' VAE dtype
    base_dim = int(vae.get("base_dim", 96))
    activations = {
        "encode": request.batch
        * (text_tokens + TEMPLATE_TOKENS)
        * int(te.get("hidden_size", 3584))
        * TEXT_BYTES_PER_TOKEN_UNIT,
        "denoise": transformer_activations(
            inner,
            heads,
            request.batch * (2 if request.cfg and request.split != "cfg" else 1),
            tokens + request.reference_tokens + text_tokens,
            plan,
        ),
        # the VAE: decoding the result (tiled), or encoding an input (untiled; the encoder's
        # full-resolution maps priced as the decoder's), whichever is larger; either may run
        # with the transformer resident (a server, several seeds)
        "decode": max(
            [
                request.batch
                * vae_activations(
                    base_dim, request.height, request.width, vae_size, request.vae_tile, scale
                ),
                *(
                    vae_activations(base_dim, h, w, vae_size, None, scale)
                    for w, h in request.encode_sizes
                ),
            ]
        ),
    }
    if request.controlnet_weights:
        weights["controlnet"] = request.controlnet_weights
        activations["denoise"] += request.controlnet_activations
    return Estimate(weights, activations, request)


def _transformer_plan(
    tensors: dict[str, TensorInfo], config: dict, request: Request, load_dtype: str | None
):
    """(the transformer tensors that load, bits_of for quantizing on load or None): without the
    modulation under the adaLN cache; the 4/8-bit plan's bits per layer."""
    from qwen_mlx.models.transformer import MODULATION_WEIGHTS
    from qwen_mlx.quantize import transformer_plan

    rename = _renamer(load_dtype)
    if request.adaln_cache:
        tensors = {k: v for k, v in tensors.items() if not MODULATION_WEIGHTS.match(rename(k))}
    if not request.quant_bits:
        return tensors, None
    plan = transformer_plan(request.quant_bits, request.group_size)
    layers = int(config.get("num_layers", 60))

    def bits_of(name: str, info: TensorInfo) -> int | None:
        return plan.bits_for(rename(name).rsplit(".", 1)[0], info.shape, layers)

    return tensors, bits_of


def _text_encoder_bits(request: Request):
    """bits_of for the language model quantized on load (the vision tower is not loaded)."""
    from qwen_mlx.quantize import text_encoder_plan

    plan = text_encoder_plan(request.text_encoder_bits, request.group_size)

    def bits_of(name: str, info: TensorInfo) -> int | None:
        return plan.bits_for(name.rsplit(".", 1)[0], info.shape)

    return bits_of


def _renamer(load_dtype: str | None) -> Callable[[str], str]:
    """Transformer weight names in this package's naming: as stored in a converted checkpoint;
    mapped from diffusers' for an unconverted one (``load_dtype`` set)."""
    return (lambda name: name) if load_dtype is None else _mlx_name


def _mlx_name(name: str) -> str:
    """A diffusers transformer weight name in this package's naming (the converter's rules)."""
    from qwen_mlx.convert.rules import rename
    from qwen_mlx.convert.transformer import RULES

    return rename(name, RULES)


def _stored_plan(config: dict) -> str:
    section = config.get("qwen_mlx", {})
    plan = section.get("precision_plan", {})
    return plan.get("name") or section.get("dtype") or "bf16"


@dataclass(frozen=True)
class Advice:
    """A change to the request that would fit: what to pass, and the estimate with it."""

    label: str  # what to tell the user, e.g. "--quantize 4 --low-memory"
    flags: tuple[str, ...]  # the CLI flags (empty when it is not a flag: a re-conversion)
    estimate: Estimate

    @property
    def peak(self) -> int:
        return self.estimate.peak

    @property
    def request(self) -> Request:
        return self.estimate.request

    def describe(self) -> str:
        return f"{self.label} (~{gib(self.peak)})"

    def to_dict(self) -> dict:
        """For JSON (the server): label, flags, peak bytes and the stage that peaks."""
        e = self.estimate
        return {"label": self.label, "flags": list(self.flags), "peak": e.peak,
                "peak_stage": e.peak_stage, "stages": dict(e.stages)}  # fmt: skip


Fit = Advice  # the earlier name


def _stored_bits(tensors: dict[str, dict[str, TensorInfo]], configs: dict[str, dict]):
    """The transformer's bits when it is quantized on disk (None: float weights)."""
    t = tensors.get("transformer", {})
    if not any(k.endswith(".scales") for k in t):
        return None
    return int((configs.get("transformer", {}).get("quantization") or {}).get("bits", 8))


def _changes(request: Request, stored_bits: int | None, text_encoder_auto: bool):
    """(label, flags, changed request) of each single change, in the order advice names them:
    a lower precision plan, ``--quantize 8``, ``--quantize 4``, ``--low-memory``."""
    out: list[tuple[str, tuple[str, ...], Request]] = []
    if request.precision not in (None, "fp16", "bf16", "bfloat16", "float16"):
        out.append(
            ("--precision bf16", ("--precision", "bf16"), replace(request, precision="bf16"))
        )
    have = request.quant_bits or stored_bits
    for bits in (8, 4):
        if have is not None and bits >= have:
            continue
        changed = replace(
            request,
            quant_bits=bits,
            # the pipeline's lean mode: 8-bit language model ("auto"), decode in small tiles
            text_encoder_bits=request.text_encoder_bits or (8 if text_encoder_auto else None),
            vae_tile=min(request.vae_tile or LEAN_DECODE_TILE, LEAN_DECODE_TILE),
        )
        if stored_bits is None:  # a float transformer quantizes as it loads
            out.append((f"--quantize {bits}", ("--quantize", str(bits)), changed))
        else:  # already quantized on disk: only a new conversion lowers the bits
            out.append((f"a checkpoint converted with --quantize {bits}", (), changed))
    if not request.low_memory:
        out.append(("--low-memory", ("--low-memory",), replace(request, low_memory=True)))
    return out


def advise(
    tensors: dict[str, dict[str, TensorInfo]],
    request: Request,
    configs: dict[str, dict],
    limit: int,
    load_dtype: str | None = None,
    text_encoder_auto: bool = True,
) -> list[Advice]:
    """What would bring the peak under ``limit``, in this order: each single change that fits
    (``--precision bf16`` for a 32-bit plan, ``--quantize 8``, ``--quantize 4``,
    ``--low-memory``), then the largest smaller square size; when no single change fits, the
    changes together, then a size with all of them.

    ``text_encoder_auto``: the user left ``--quantize-text-encoder`` at auto (so ``--quantize``
    also quantizes the language model to 8 bits)."""

    def est(r: Request) -> Estimate:
        return estimate(tensors, r, configs, load_dtype)

    changes = _changes(request, _stored_bits(tensors, configs), text_encoder_auto)
    advice = [Advice(label, flags, e) for label, flags, r in changes if (e := est(r)).peak <= limit]
    base, label, flags = request, "", ()
    if not advice and changes:  # together: the precision change, the fewest bits, low memory
        quant = [c for c in changes if c[2].quant_bits != request.quant_bits]
        together = [c for c in changes if c[2].quant_bits == request.quant_bits] + quant[-1:]
        for name, more, changed in sorted(together, key=changes.index):
            diff = {f.name: getattr(changed, f.name) for f in fields(Request)}
            base = replace(base, **{k: v for k, v in diff.items() if v != getattr(request, k)})
            label, flags = f"{label}{name} ", (*flags, *more)
        if len(together) > 1 and (e := est(base)).peak <= limit:
            advice.append(Advice(label.strip(), flags, e))
    side = _largest_square(tensors, base, configs, limit, load_dtype)
    if side:
        smaller = est(replace(base, width=side, height=side))
        more = ("--width", str(side), "--height", str(side))
        advice.append(Advice(f"{label}--width {side} --height {side}", (*flags, *more), smaller))
    return advice


def alternatives(
    tensors: dict[str, dict[str, TensorInfo]],
    request: Request,
    configs: dict[str, dict],
    limit: int,
    load_dtype: str | None = None,
    text_encoder_auto: bool = True,
) -> list[Advice]:
    """``advise`` (the earlier name)."""
    return advise(tensors, request, configs, limit, load_dtype, text_encoder_auto)


def _largest_square(tensors, request: Request, configs, limit: int, load_dtype) -> int | None:
    """The largest square side (multiple of 16, below the request) that fits, if any."""
    lo, hi = 16, min(max(request.width, request.height), 1 << 15) // 16 * 16 - 16
    smallest = replace(request, width=lo, height=lo)
    if hi < lo or estimate(tensors, smallest, configs, load_dtype).peak > limit:
        return None
    while lo < hi:
        mid = (lo + hi + 16) // 32 * 16
        r = replace(request, width=mid, height=mid)
        if estimate(tensors, r, configs, load_dtype).peak <= limit:
            lo = mid
        else:
            hi = mid - 16
    return lo


@dataclass
class MemoryCheck:
    """An estimate against this machine's figure, with advice when it does not fit."""

    estimate: Estimate
    limit: int
    where: str  # where the limit comes from
    advice: list[Advice]

    @property
    def fits(self) -> bool:
        return self.estimate.peak <= self.limit

    def advice_text(self) -> str:
        """ "would fit: --quantize 8 (~14.1 GiB); ..." or "nothing smaller fits either"."""
        if not self.advice:
            return "nothing smaller fits either"
        return "would fit: " + "; ".join(a.describe() for a in self.advice)

    def summary(self) -> str:
        """One line: the peak, the machine's figure, and (when it does not fit) the advice."""
        head = (
            f"this needs about {self.estimate.describe()}, "
            f"{'within' if self.fits else 'more than'} the {gib(self.limit)} available "
            f"({self.where})"
        )
        return head if self.fits else f"{head}; {self.advice_text()}"

    def lines(self) -> list[str]:
        """What ``info`` and ``--dry-run`` print: each stage, the peak against this machine,
        then what would fit, one change a line."""
        e = self.estimate
        out = [
            f"  {stage:8s} {gib(total):>9s}  (activations {gib(e.activations.get(stage, 0))})"
            for stage, total in e.stages.items()
        ]
        verdict = "fits" if self.fits else "does NOT fit"
        out.append(
            f"expected peak: {e.describe()}; this machine: {gib(self.limit)} ({self.where}): "
            f"{verdict}"
        )
        return out + self.advice_lines()

    def advice_lines(self) -> list[str]:
        """What would fit, one change a line (nothing when it fits)."""
        if self.fits:
            return []
        if not self.advice:
            return ["nothing smaller fits either"]
        width = max(len(a.label) for a in self.advice)
        return ["would fit:"] + [
            f"  {a.label:{width}s}  ~{gib(a.peak)} while {STAGE_VERBS[a.estimate.peak_stage]}"
            for a in self.advice
        ]

    def to_dict(self) -> dict:
        e = self.estimate
        return {"fits": self.fits, "peak": e.peak, "peak_stage": e.peak_stage,
                "stages": dict(e.stages), "limit": self.limit, "limit_source": self.where,
                "advice": [a.to_dict() for a in self.advice]}  # fmt: skip


def check(
    tensors: dict[str, dict[str, TensorInfo]],
    request: Request,
    configs: dict[str, dict],
    load_dtype: str | None = None,
    text_encoder_auto: bool = True,
) -> MemoryCheck:
    """The estimate against ``machine_memory()``; advice (``advise``) only when it does not
    fit."""
    est = estimate(tensors, request, configs, load_dtype)
    limit, where = machine_memory()
    advice = []
    if est.peak > limit:
        advice = advise(tensors, request, configs, limit, load_dtype, text_encoder_auto)
    return MemoryCheck(est, limit, where, advice)


def check_fits(
    tensors: dict[str, dict[str, TensorInfo]],
    request: Request,
    configs: dict[str, dict],
    load_dtype: str | None = None,
    text_encoder_auto: bool = True,
) -> Estimate:
    """The estimate, or MemoryLimitError naming it, the machine's figure and what would fit
    (the structured check is the error's ``check``)."""
    result = check(tensors, request, configs, load_dtype, text_encoder_auto)
    if result.fits:
        return result.estimate
    raise MemoryLimitError(
        f"{result.summary()}; or pass --ignore-memory-limit to try anyway", result
    )


class MemoryLimitError(QwenMLXError, MemoryError):
    """The estimated peak is above the machine's memory; ``check`` holds the estimate and the
    advice."""

    def __init__(self, message: str, check: MemoryCheck | None = None):
        super().__init__(message)
        self.check = check


def source_inputs(source) -> tuple[dict, dict, str | None]:
    """(tensors, configs, load_dtype) of a ``loading.ModelSource``, from headers only."""
    tensors = local_tensors(source.root)
    configs = {c: source.config(c) for c in tensors}
    return tensors, configs, None if source.converted else source.dtype


def source_estimate(source, request: Request) -> Estimate:
    tensors, configs, load_dtype = source_inputs(source)
    return estimate(tensors, request, configs, load_dtype)


def source_check(source, request: Request, text_encoder_auto: bool = True) -> MemoryCheck:
    """``check`` for a ``loading.ModelSource``: what ``info`` and ``--dry-run`` print."""
    tensors, configs, load_dtype = source_inputs(source)
    return check(tensors, request, configs, load_dtype, text_encoder_auto)


def check_source(source, request: Request, text_encoder_auto: bool = True) -> Estimate:
    """``check_fits`` for a ``loading.ModelSource``."""
    tensors, configs, load_dtype = source_inputs(source)
    return check_fits(tensors, request, configs, load_dtype, text_encoder_auto)
