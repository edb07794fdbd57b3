"""A hub checkpoint described from its headers alone: nothing downloaded but the small JSON
configs, nothing converted. ``qwen-mlx info ORG/NAME`` uses this; safetensors headers are read
with HTTP range requests (``HfApi.parse_safetensors_file_metadata``). Offline
(``HF_HUB_OFFLINE=1``) or when the hub does not answer, a snapshot in the Hugging Face cache is
described instead (see ``qwen_mlx.hub``)."""

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

    from qwen_mlx import hub

    why = None if hub.offline() else hub.unreachable(repo_id)
    if why is not None or hub.offline():
        cached = cached_headers(repo_id, revision)
        if cached is not None:
            return cached
        if why is not None:
            raise ModelNotFoundError(hub.unreachable_message(repo_id, why, "read it"))
        raise ModelNotFoundError(hub.offline_message(repo_id))
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


def cached_headers(
    repo_id: str, revision: str | None = None
) -> tuple[dict[str, dict[str, TensorInfo]], dict[str, dict]] | None:
    """The same description from a snapshot in the Hugging Face cache (no connection), or None
    when the cache holds no complete one."""
    from huggingface_hub import snapshot_download

    from qwen_mlx.io import list_shards, tensor_infos
    from qwen_mlx.loading import HUB_PATTERNS

    try:
        root = Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True
            )
        )
    except Exception:  # noqa: BLE001 - not cached (the hub's error types vary by version)
        return None
    tensors: dict[str, dict[str, TensorInfo]] = {}
    configs: dict[str, dict] = {}
    for comp in COMPONENTS:
        folder = root / comp
        if not (folder / "config.json").is_file():
            continue
        configs[comp] = read_json(folder / "config.json")
        tensors[comp] = {}
        for shard in list_shards(folder):
            tensors[comp].update(tensor_infos(shard))
    return (tensors, configs) if tensors else None
