"""A hub checkpoint described from its headers alone: nothing downloaded but the small JSON
configs, nothing converted. ``qwen-mlx info ORG/NAME`` uses this; safetensors headers are read
with HTTP range requests (``HfApi.parse_safetensors_file_metadata``)."""

from __future__ import annotations

from pathlib import Path

from qwen_mlx.errors import CheckpointError, ModelNotFoundError
from qwen_mlx.io import TensorInfo, read_json

COMPONENTS = ("text_encoder", "transformer", "vae")


def hub_headers(
    repo_id: str, revision: str | None = None
) -> tuple[dict[str, dict[str, TensorInfo]], dict[str, dict]]:
    """({component: {name: TensorInfo}}, {component: config}) of a hub repo."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    try:
        files = api.list_repo_files(repo_id, revision=revision)
        tensors: dict[str, dict[str, TensorInfo]] = {}
        configs: dict[str, dict] = {}
        for comp in COMPONENTS:
            shards = sorted(
                f
                for f in files
                if f.startswith(f"{comp}/") and f.count("/") == 1 and f.endswith(".safetensors")
            )
            if not shards:
                continue
            config = hf_hub_download(repo_id, f"{comp}/config.json", revision=revision)
            configs[comp] = read_json(Path(config))
            tensors[comp] = {}
            for shard in shards:
                meta = api.parse_safetensors_file_metadata(repo_id, shard, revision=revision)
                for name, t in meta.tensors.items():
                    tensors[comp][name] = TensorInfo(t.dtype, tuple(t.shape))
    except (ModelNotFoundError, CheckpointError):
        raise
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise ModelNotFoundError(
            f"{repo_id}: no such folder, and cannot read it from the hub: {e}"
        ) from e
    if not tensors:
        raise ModelNotFoundError(f"{repo_id} on the hub has no transformer, vae or text_encoder")
    return tensors, configs
