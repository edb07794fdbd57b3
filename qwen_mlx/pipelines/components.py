"""Components: one owner for every model a pipeline runs.

It loads each component on first use, frees it, quantizes the transformer and the language
model as they load, checks every config against its weights' shapes before the first load,
holds the LoRA state and the adaLN table, and prices a request with the memory plan. Every
pipeline (txt2img, img2img, inpaint, Edit) uses it unchanged; a pipeline states only what
differs through ``text_encoder_builder`` (Edit: the text encoder with its vision tower).

The memory plan is enforced here, once: the text encoder and the transformer are never held
together (loading the text encoder frees the transformer; the transformer reloads lazily, with
its LoRAs, when sampling continues).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx

from qwen_mlx import memory
from qwen_mlx.adaln import AdaLNCache
from qwen_mlx.errors import RequestError
from qwen_mlx.loading import ModelSource
from qwen_mlx.lora import (
    LoRA,
    LoraStack,
    check_lora_scale,
    fuse_weights,
    lora_key,
    read_lora,
    target_shapes,
)
from qwen_mlx.memory import LEAN_DECODE_TILE, cache_limit
from qwen_mlx.models.transformer import Modulation, TransformerConfig
from qwen_mlx.precision import PrecisionPlan, component_dtype
from qwen_mlx.quantize import (
    check_bits,
    group_size_of,
    is_quantized,
    quantize_stream,
    text_encoder_bits,
    text_encoder_plan,
    transformer_plan,
)

# (source, config, weights, dtype) -> a text encoder model; weights hold every tensor of the
# text_encoder/ folder (the language model quantized if asked), the vision tower's included.
TextEncoderBuilder = Callable[[ModelSource, dict, dict, "str | None"], object]


class ZeroCondTable:
    """An adaLN table whose last row is t = 0 (Edit-2511, ``zero_cond_t``): step i's modulation
    with that row's image modulation as ``Modulation.zero`` (the reference tokens')."""

    def __init__(self, table: Sequence[Modulation]):
        self.table = table
        self.zero = [img for img, _ in table[len(table) - 1].blocks]

    def __len__(self) -> int:
        return len(self.table) - 1

    def __getitem__(self, step: int) -> Modulation:
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} out of range for {len(self)} steps")
        return dataclasses.replace(self.table[step], zero=self.zero)


class Components:
    """The transformer, VAE and text encoder of one checkpoint, loaded lazily and freed by
    stage. See the module docstring for what it owns."""

    def __init__(
        self,
        source: ModelSource,
        precision: PrecisionPlan | str | None = None,
        compile: bool = True,
        quantize: int | None = None,
        quantize_text_encoder: int | str | None = "auto",
        adaln_cache: bool = True,
        decode_tile_size: int | None = None,
        text_encoder_builder: TextEncoderBuilder | None = None,
    ):
        self.source = source
        self.compile = compile
        self.quantize = check_bits(quantize) if quantize else None
        self.text_encoder_bits = text_encoder_bits(quantize_text_encoder, self.quantize)
        self.adaln_cache = adaln_cache
        self.text_encoder_builder = text_encoder_builder or language_model_encoder
        self._adaln = AdaLNCache()
        mx.set_cache_limit(cache_limit())
        # A quantized (memory-lean) run decodes in tiles of 64 latent pixels (512x512 images:
        # tiled and untiled agree to rounding; about 1.8x the work of the high-resolution
        # layers), which bounds the decoder's activations; otherwise the VAE's default.
        lean = bool(self.quantize) or "quantization" in source.config("transformer")
        self.decode_tile_size = decode_tile_size or (LEAN_DECODE_TILE if lean else None)
        if precision == "auto":
            from qwen_mlx.device import auto_precision

            precision, _ = auto_precision()
        if isinstance(precision, str):
            component_dtype(precision, "vae")  # an unknown name fails here, before any work
        self.precision = precision
        self._models: dict[str, object] = {}
        self._checked = False  # every component's config against its weights' shapes
        self._loras: list[tuple[LoRA, float]] = []
        self._lora_stack: LoraStack | None = None
        self._controlnet: dict | None = None  # {"folder", "name", "config"}: load_controlnet

    @property
    def vae_scale(self) -> int:
        """The VAE's spatial factor: 2x down-sampling per temporal stage (8 when released)."""
        vae_config = self.source.config("vae")
        return 2 ** len(vae_config.get("temperal_downsample", [False, True, True]))

    # -- checks

    def check(self) -> None:
        """Every component's config against its weights' shapes, from the headers (no tensor
        read), once: before the first component loads, so a mismatch is an error before any
        expensive stage, not after minutes of text encoding."""
        if not self._checked:
            from qwen_mlx.shapes import check_source

            check_source(self.source)
            self._checked = True

    def loaded(self) -> list[str]:
        """The components held in memory now."""
        return list(self._models)

    def _dtype(self, name: str) -> str | None:
        """The dtype the precision plan gives the VAE / text encoder (None: as stored)."""
        return component_dtype(self.precision, name) if isinstance(self.precision, str) else None

    # -- the components

    @property
    def transformer(self):
        if "transformer" not in self._models:
            from qwen_mlx.models.transformer import QwenImageTransformer

            self.check()
            self.free("text_encoder")  # memory plan: never both at once
            world = self.tensor_world
            if world is not None:  # tensor parallel: this process's slices only
                from qwen_mlx.distributed import sharded_transformer_weights

                config, weights, fused = sharded_transformer_weights(
                    self.source, world, not self.adaln_cache, self._loras
                )
            else:
                config, weights = self.source.component("transformer")
                # LoRAs loaded before the transformer are fused into the float weights before
                # the plan folds and casts them (exact); quantized checkpoints get them beside.
                fused = bool(self._loras) and not is_quantized(weights)
                if fused:
                    stored = PrecisionPlan.from_config(config, int(config.get("num_layers", 60)))
                    weights = fuse_weights(weights, self._loras, stored)
            model = QwenImageTransformer.from_weights(
                config,
                weights,
                self.precision,
                where=str(self.source.folder("transformer")),
                modulation=not self.adaln_cache,
                quantize=self.quantize,
                group=world.group if world is not None else None,
            )
            model.compile(self.compile)
            # Unloading drops the model (it reloads clean), so no copies of originals are kept.
            self._lora_stack = LoraStack(model, keep_originals=False)
            for lora, scale in [] if fused else self._loras:
                self._lora_stack.add(self._model_lora(lora), scale)
            self._models["transformer"] = model
            mx.clear_cache()
        return self._models["transformer"]

    @property
    def vae(self):
        if "vae" not in self._models:
            from qwen_mlx.models.vae import QwenImageVAE

            self.check()
            config, weights = self.source.component("vae")
            self._models["vae"] = QwenImageVAE.from_weights(
                config, weights, self._dtype("vae"), where=str(self.source.folder("vae"))
            )
        return self._models["vae"]

    @property
    def text_encoder(self):
        if "text_encoder" not in self._models:
            from qwen_mlx.models.text_encoder import LANGUAGE_MODEL_PREFIX

            self.check()
            self.free("transformer")  # memory plan: never both at once
            dtype = self._dtype("text_encoder")
            config, weights = self.source.component("text_encoder", dtype=dtype)
            if self.text_encoder_bits and not is_quantized(weights):
                plan = text_encoder_plan(self.text_encoder_bits)
                lm = {k: v for k, v in weights.items() if k.startswith(LANGUAGE_MODEL_PREFIX)}
                rest = {k: v for k, v in weights.items() if k not in lm}  # the vision tower
                weights = {**quantize_stream(lm, plan.bits_for, plan.group_size), **rest}
                quantization = {"bits": plan.bits, "group_size": plan.group_size}
                config = {**config, "quantization": quantization}
            model = self.text_encoder_builder(self.source, config, weights, dtype)
            self._models["text_encoder"] = model
        return self._models["text_encoder"]

    tensor_world = None  # qwen_mlx.distributed.World: load the transformer sharded over it

    def free(self, *names: str) -> None:
        """Drop components (all when none named) and return their memory to the system."""
        for name in names or list(self._models):
            self._models.pop(name, None)
            if name == "transformer":
                self._lora_stack = None
        mx.clear_cache()

    # -- the ControlNet

    def load_controlnet(self, path, revision: str | None = None) -> None:
        """See ``QwenImagePipeline.load_controlnet``: resolved and checked (class, widths
        against the transformer, weights' shapes from the headers); nothing loads yet."""
        from qwen_mlx import control

        folder = control.resolve(path, self.source.dtype, revision)
        config = control.read_config(folder, self.transformer_config(), str(path))
        self.unload_controlnet()
        self._controlnet = {"folder": folder, "name": str(path), "config": config}

    def unload_controlnet(self) -> None:
        self._controlnet = None
        self.free("controlnet")

    @property
    def controlnet_info(self) -> dict | None:
        """{"folder", "name", "config"} of the loaded ControlNet, or None."""
        return self._controlnet

    def controlnet_plan(self) -> PrecisionPlan:
        """The ControlNet's precision plan: the transformer's, by name, for its own depth (a
        ControlNet converted for a folded plan runs under that plan only)."""
        from qwen_mlx import control
        from qwen_mlx.models.controlnet import ControlNetConfig
        from qwen_mlx.models.transformer import QwenImageTransformer

        config = self._controlnet["config"]
        cfg = ControlNetConfig.from_dict(config)
        if "transformer" in self._models:
            plan = self._models["transformer"].plan
        else:
            folder = str(self.source.folder("transformer"))
            plan = QwenImageTransformer.target_plan(
                self.transformer_config(), self.precision, folder
            )
        stored = PrecisionPlan.from_config(config, cfg.num_layers)
        if stored.folded:
            return stored
        return control.plan_for(plan, cfg.num_layers, cfg.eps)

    @property
    def controlnet(self):
        if self._controlnet is None:
            raise RequestError("no ControlNet loaded: call load_controlnet(path) first")
        if "controlnet" not in self._models:
            from qwen_mlx.loading import load_component
            from qwen_mlx.models.controlnet import QwenImageControlNet

            info = self._controlnet
            config, weights = load_component(info["folder"])
            model = QwenImageControlNet.from_weights(
                config,
                weights,
                self.controlnet_plan(),
                where=info["name"],
                modulation=not self.adaln_cache,
                quantize=self.quantize,
            )
            model.compile(self.compile)
            self._models["controlnet"] = model
            mx.clear_cache()
        return self._models["controlnet"]

    def controlnet_table(self, timesteps: mx.array):
        """The ControlNet's adaLN table for ``timesteps`` (see ``modulation_table``)."""
        from qwen_mlx.models.controlnet import modulation_table

        table = modulation_table(
            self._controlnet["folder"],
            self.controlnet_plan(),
            timesteps,
            self.quantize,
            self._adaln,
        )
        mx.clear_cache()
        return table

    def controlnet_weight_bytes(self) -> int:
        """What the loaded ControlNet occupies once loaded (0 without one), from headers."""
        if self._controlnet is None:
            return 0
        from qwen_mlx.models.controlnet import weight_bytes

        return weight_bytes(
            self._controlnet["folder"], self.controlnet_plan(), self.adaln_cache, self.quantize
        )

    # -- LoRAs

    def load_lora(self, path: str | Path, scale: float = 1.0) -> LoRA:
        """See ``QwenImagePipeline.load_lora``."""
        scale = check_lora_scale(scale, Path(path).name)  # "abc", nan: one line, nothing read
        lora = read_lora(path)  # NaN/inf tensors refused here, naming the file and keys
        if self.tensor_world is not None and "transformer" in self._models:
            raise RequestError("with --parallel tensor, load LoRAs before the transformer loads")
        if self._lora_stack is not None and "transformer" in self._models:
            self._lora_stack.add(self._model_lora(lora), scale)
        else:
            lora.check(self._transformer_shapes())
        self._loras.append((lora, scale))
        return lora

    def unload_loras(self) -> None:
        if self._loras and "transformer" in self._models:
            self.free("transformer")
        self._loras = []

    @property
    def loras(self) -> list[tuple[LoRA, float]]:
        return list(self._loras)

    def _model_lora(self, lora: LoRA) -> LoRA:
        """The part of ``lora`` the loaded transformer holds: under the adaLN cache the
        modulation updates go into the modulation table instead (``modulation_table``)."""
        if not self.adaln_cache:
            return lora
        from qwen_mlx.models.transformer import MODULATION_WEIGHTS

        updates = {k: v for k, v in lora.updates.items() if not MODULATION_WEIGHTS.match(k)}
        return dataclasses.replace(lora, updates=updates)

    def lora_key(self) -> str:
        """A stable identity of the loaded LoRA set ("" for none): file contents and scales.
        Anything that caches transformer outputs (e.g. modulation) must include it."""
        return lora_key(self._loras)

    def _transformer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The transformer's weight shapes from its config, without loading any weight (MLX
        initialises the parameters lazily, so nothing is computed)."""
        from qwen_mlx.models.transformer import QwenImageTransformer

        config = TransformerConfig.from_dict(self.transformer_config())
        return target_shapes(QwenImageTransformer(config))

    # -- facts that never load anything

    @property
    def precision_name(self) -> str:
        """The transformer's precision plan name, without loading (or reloading) anything."""
        if "transformer" in self._models:
            return self._models["transformer"].plan.name
        if isinstance(self.precision, PrecisionPlan):
            return self.precision.name
        if isinstance(self.precision, str):
            return self.precision
        config = self.transformer_config()
        return PrecisionPlan.from_config(config, int(config.get("num_layers", 60))).name

    def transformer_config(self) -> dict:
        return self.source.config("transformer")

    # -- the adaLN cache

    def modulation_table(self, timesteps: mx.array) -> Sequence[Modulation]:
        """Every step's modulation for ``timesteps`` (the sigmas the transformer receives, one
        per step) from the adaLN cache, computed (streamed from disk, one block at a time, with
        the loaded LoRAs) and stored if missing. Nothing else of the transformer is loaded."""
        from qwen_mlx.adaln import cache_key, compute_modulation, weights_identity
        from qwen_mlx.models.transformer import MODULATION_WEIGHTS, QwenImageTransformer

        folder = self.source.folder("transformer")
        config, weights = self.source.component("transformer")  # lazy: headers only
        plan = QwenImageTransformer.target_plan(config, self.precision, str(folder))
        quant = transformer_plan(self.quantize) if self.quantize else None
        extra = {"converted": self.source.converted, "quantize": self.quantize}
        if not self.source.converted:
            extra["dtype"] = self.source.dtype
        zero_cond = bool(config.get("zero_cond_t"))
        if zero_cond:  # Edit-2511 also needs every block's image modulation at t = 0: one row more
            timesteps = mx.concatenate([timesteps, mx.zeros((1,), dtype=timesteps.dtype)])
        key = cache_key(weights_identity(folder), plan, timesteps, self.lora_key(), extra)

        def build() -> list[Modulation]:
            cfg = TransformerConfig.from_dict(config)
            stored = PrecisionPlan.from_config(config, cfg.num_layers)
            mods = weights
            loras = self._loras
            if loras and not is_quantized(weights):  # fused into the float weights, as the model
                mods, loras = fuse_weights(weights, loras, stored), []
            mods = {k: v for k, v in mods.items() if MODULATION_WEIGHTS.match(k)}
            return compute_modulation(
                cfg, mods, stored, plan, timesteps, group_size_of(config), quant, loras
            )

        table = self._adaln.get(key, build)
        mx.clear_cache()
        return ZeroCondTable(table) if zero_cond else table

    # -- the memory plan

    def memory_request(
        self,
        width: int,
        height: int,
        cfg: bool,
        max_sequence_length: int = 512,
        low_memory: bool = False,
        batch: int = 1,
        controlnet: bool = False,
        split: str | None = None,
        processes: int = 1,
        encode_sizes: tuple[tuple[int, int], ...] = (),
        reference_tokens: int = 0,
    ) -> memory.Request:
        """What a generation of this size asks of memory with these components' settings
        (``controlnet``: the loaded ControlNet runs: its weights and its residuals, held
        through the transformer's forward, count while denoising; ``split``, ``processes``:
        one process's share of an ``mlx.launch`` job, see ``memory.Request``)."""
        extra = {}
        if controlnet and self._controlnet is not None:
            from qwen_mlx.models.controlnet import residual_bytes

            extra = dict(
                controlnet_weights=self.controlnet_weight_bytes(),
                controlnet_activations=residual_bytes(
                    self._controlnet["config"], width, height, self.vae_scale, batch, cfg
                ),
            )
        return memory.Request(
            width=width,
            height=height,
            batch=batch,
            cfg=cfg,
            max_sequence_length=max_sequence_length,
            low_memory=low_memory,
            precision=self.precision if isinstance(self.precision, str) else None,
            quant_bits=self.quantize,
            vae_tile=self.decode_tile_size or 128,
            adaln_cache=self.adaln_cache,
            text_encoder_bits=self.text_encoder_bits,
            split=split if processes > 1 else None,
            processes=processes,
            encode_sizes=encode_sizes,
            reference_tokens=reference_tokens,
            **extra,
        )


def language_model_encoder(source: ModelSource, config: dict, weights: dict, dtype: str | None):
    """The txt2img text encoder: the language model alone (the vision tower stays on disk)."""
    from qwen_mlx.models.text_encoder import QwenTextEncoder

    where = str(source.folder("text_encoder"))
    return QwenTextEncoder.from_weights(
        config, weights, source.folder("tokenizer"), dtype=dtype, where=where
    )
