"""Convert a Hugging Face diffusers-layout checkpoint into qwen-mlx's MLX layout.

Each component with a converter module here (``convert/<component>.py``) is converted shard by
shard through that module's pure functions:

    convert_weights(weights: dict[str, mx.array], config: dict, options) -> dict[str, mx.array]
    convert_config(config: dict, options) -> dict   # may add keys under config["qwen_mlx"]
    prepare_options(folder: Path, options) -> options  # optional: fill options from the folder

Everything else (tokenizer, scheduler, processor) is copied. Before anything is written, every
component's config is checked against its weights' shapes (read from the shard headers). The
output is written to a temporary sibling folder and renamed into place (see ``destination``:
what may be replaced, the lock, interrupted runs), so a failed run leaves nothing behind.
"""

from __future__ import annotations

import importlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import mlx.core as mx

from qwen_mlx.convert import destination
from qwen_mlx.convert.errors import ConversionError
from qwen_mlx.convert.io import (
    iter_weights,
    list_shards,
    read_json,
    save_shard,
    shard_header,
    write_index,
)
from qwen_mlx.convert.options import FORMAT_VERSION, ConvertOptions
from qwen_mlx.convert.progress import ConvertProgress
from qwen_mlx.dtypes import DTYPES
from qwen_mlx.io import CONVERTED_COMPONENTS, is_converted
from qwen_mlx.precision import PLAN_NAMES, component_dtype
from qwen_mlx.shapes import ConfigMismatchError, check_component
from qwen_mlx.variants import normalize_variant

# A pipeline's controlnet/ folder, or a standalone ControlNet folder (see ``component_name``).
CONVERTED = (*CONVERTED_COMPONENTS, "controlnet")


def component_name(folder: Path) -> str:
    """The component a folder holds: "controlnet" for a ControlNet config (whatever the
    folder's name), else the folder's name."""
    config = Path(folder) / "config.json"
    if folder.name not in CONVERTED and config.is_file():
        from qwen_mlx.models.controlnet import is_controlnet_config

        try:
            if is_controlnet_config(json.loads(config.read_text())):
                return "controlnet"
        except (OSError, ValueError):
            pass
    return folder.name


def component_module(name: str) -> ModuleType | None:
    """The converter module for a component folder, or None if it is copied as is."""
    if name not in CONVERTED:
        return None
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.{name}":
            return None
        raise


def _converted_config(module: ModuleType, config: dict, options: ConvertOptions, src: Path) -> dict:
    config = module.convert_config(dict(config), options)
    section = {"format_version": FORMAT_VERSION, "dtype": options.dtype, "source": str(src)}
    section.update(config.get("qwen_mlx", {}))
    config["qwen_mlx"] = section
    return config


def _prepared(folder: Path, options: ConvertOptions) -> tuple[ModuleType, dict, ConvertOptions]:
    """(converter module, source config, options completed for this component)."""
    module = component_module(component_name(folder))
    if module is None:
        raise ConversionError(f"no converter for component {folder.name!r}")
    config = read_json(folder / "config.json")
    prepare = getattr(module, "prepare_options", None)
    if prepare is not None:  # e.g. the transformer detects its model variant from the folder
        options = prepare(folder, options)
    if options.precision:  # the plan also decides the VAE's and the text encoder's dtype
        dtype = component_dtype(options.precision, folder.name)
        options = replace(options, dtype=dtype) if dtype else options
    return module, config, options


def iter_converted_component(
    folder: Path, options: ConvertOptions
) -> tuple[dict, Iterator[tuple[str, dict[str, mx.array]]]]:
    """(converted config, iterator of (shard stem, converted weights)) for one component folder.

    Nothing is written: the pipeline uses this to load unconverted checkpoints in memory.
    """
    folder = Path(folder)
    module, config, options = _prepared(folder, options)
    out_config = _converted_config(module, config, options, folder)

    def shards() -> Iterator[tuple[str, dict[str, mx.array]]]:
        for path, weights in iter_weights(folder):
            yield path.name, module.convert_weights(weights, config, options)

    return out_config, shards()


# Shape-only stand-ins: MLX arrays are lazy, so these are never allocated.
_STAND_IN = {"F64": mx.float64, "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


def check_component_folder(folder: Path, options: ConvertOptions) -> None:
    """Check a component's config against its weights' shapes without reading any tensor:
    the converter runs on lazy stand-ins built from the shard headers."""
    folder = Path(folder)
    # Shapes are checked before quantization (which packs weights into other shapes).
    options = replace(options, quantize=None, quantize_text_encoder=None)
    module, config, options = _prepared(folder, options)
    out_config = _converted_config(module, config, options, folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in list_shards(folder):
        stand_ins = {
            name: mx.zeros(info.shape, dtype=_STAND_IN.get(info.dtype, mx.uint8))
            for name, info in shard_header(shard).items()
        }
        try:
            converted = module.convert_weights(stand_ins, config, options)
        except ValueError as e:
            raise ConversionError(f"{shard}: {e}") from e
        shapes.update({k: tuple(v.shape) for k, v in converted.items()})
    try:
        check_component(component_name(folder), out_config, shapes, str(folder / "config.json"))
    except ConfigMismatchError as e:
        raise ConversionError(str(e)) from e


ProgressCallback = Callable[[ConvertProgress], None]


def convert_component(
    src: Path, dst: Path, options: ConvertOptions, progress: ProgressCallback | None = None
) -> dict:
    """Convert one component folder into ``dst`` (which must exist). Returns its config.

    ``progress`` gets a ``ConvertProgress`` when the component starts and after each shard."""
    src = Path(src)
    sizes = {p.name: p.stat().st_size for p in list_shards(src)}
    start, done = time.perf_counter(), 0

    def report(shard: int) -> None:
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress(
                ConvertProgress(src.name, shard, len(sizes), done, sum(sizes.values()), elapsed)
            )

    report(0)
    config, shards = iter_converted_component(src, options)
    weight_map: dict[str, str] = {}
    total = 0
    written: list[str] = []
    for i, (source, weights) in enumerate(shards, 1):
        if weights:  # not, e.g., a shard holding only dropped tensors
            name = f"model-{len(written) + 1:05d}.safetensors"
            save_shard(dst / name, weights)
            written.append(name)
            for k, v in weights.items():
                weight_map[k] = name
                total += v.nbytes
        del weights  # free this shard before reading the next one
        done += sizes.get(source, 0)
        report(i)
    # Rename shards to the usual -of- form now that their count is known.
    n = len(written)
    renames = {old: old.replace(".safetensors", f"-of-{n:05d}.safetensors") for old in written}
    for old, new in renames.items():
        (dst / old).rename(dst / new)
    write_index(dst, {k: renames[v] for k, v in weight_map.items()}, total)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return config


def checked_options(options: ConvertOptions) -> ConvertOptions:
    """Options with the variant in canonical form; unknown names are refused up front."""
    if options.precision is not None and options.precision not in (*PLAN_NAMES, *DTYPES, "auto"):
        raise ConversionError(
            f"unknown precision {options.precision!r}; choose one of {', '.join(PLAN_NAMES)}"
        )
    if options.variant is not None:
        try:
            options = replace(options, variant=normalize_variant(options.variant))
        except ValueError as e:
            raise ConversionError(str(e)) from e
    return options


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    options: ConvertOptions | None = None,
    force: bool = False,
    log=None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Convert a diffusers-layout checkpoint folder ``src`` (or a standalone ControlNet folder,
    recognised by its config) into ``dst`` atomically.

    Everything that can be checked is checked before anything is written (options, source
    layout, each config against its weights' shapes, what DST is); see ``destination`` for
    how DST is written, locked and, with ``force``, replaced. ``log`` gets one-line messages;
    ``progress`` a ``ConvertProgress`` per converted component's start and shard.
    """
    options = checked_options(options or ConvertOptions())
    src, dst = Path(src), Path(dst)
    log = log or (lambda msg: None)
    if not src.is_dir():
        raise ConversionError(f"source checkpoint not found: {src}")
    if is_converted(src):
        raise ConversionError(f"{src} is already a qwen-mlx checkpoint")
    if not (src / "model_index.json").is_file() and component_name(src) == "controlnet":
        # A standalone ControlNet folder (config.json + weights): converted as one component.
        destination.check_destination(src, dst, force)
        check_component_folder(src, options)

        def write(tmp: Path) -> None:
            log(f"converting the ControlNet {src.name}")
            convert_component(src, tmp, options, progress)
            for extra in sorted(src.iterdir()):  # README, licence, example images
                if extra.is_file() and extra.suffix not in (".safetensors", ".json", ".bin"):
                    shutil.copy2(extra, tmp / extra.name)

    else:
        index = read_json(src / "model_index.json")
        destination.check_destination(src, dst, force)
        components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
        for name in components:
            if not (src / name).is_dir():
                raise ConversionError(f"missing component folder: {src / name}")
        children = [c for c in sorted(src.iterdir()) if c.name != "model_index.json"]
        children = [c for c in children if not c.name.startswith(".")]
        for child in children:
            if child.is_dir() and component_module(child.name) is not None:
                check_component_folder(child, options)

        def write(tmp: Path) -> None:
            _write(src, children, tmp, index, options, log, progress)

    try:
        created = destination.make_parents(dst.parent)
    except OSError as e:
        raise ConversionError(f"cannot create {dst.parent}: {e.strerror or e}") from e
    try:
        with destination.locked(dst, log), destination.signals_interrupt():
            destination.remove_stale(dst, log)
            destination.check_destination(src, dst, force)  # again, now that DST is ours
            tmp = destination.make_temp(dst)
            try:
                write(tmp)
                destination.finish(tmp, dst, force, log)
            except BaseException:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
                    log(f"removed the temporary folder {tmp}")
                raise
    except OSError as e:
        destination.remove_created(created)
        where = f" ({e.filename})" if e.filename else ""
        raise ConversionError(f"cannot write {dst}: {e.strerror or e}{where}") from e
    except BaseException:
        destination.remove_created(created)
        raise
    return dst


def _write(
    src: Path,
    children: list[Path],
    tmp: Path,
    index: dict,
    options: ConvertOptions,
    log,
    progress: ProgressCallback | None = None,
) -> None:
    for child in children:
        if child.is_dir() and component_module(child.name) is not None:
            log(f"converting {child.name}")
            (tmp / child.name).mkdir()
            convert_component(child, tmp / child.name, options, progress)
        elif child.is_dir():
            log(f"copying {child.name}")
            shutil.copytree(child, tmp / child.name)
        else:
            shutil.copy2(child, tmp / child.name)
    index = dict(index)
    index["qwen_mlx"] = {"format_version": FORMAT_VERSION, "dtype": options.dtype}
    if options.precision:
        index["qwen_mlx"]["precision"] = options.precision
    for key in ("quantize", "quantize_text_encoder"):
        if getattr(options, key):
            index["qwen_mlx"][key] = {
                "bits": getattr(options, key),
                "group_size": options.group_size,
            }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
