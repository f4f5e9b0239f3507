"""Turn a model argument (a directory or a Hugging Face repo id) into a local model directory:
an existing directory wins, then the Hugging Face cache, then a download when allowed."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.utils import (
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    validate_repo_id,
)

from inference_pio import envs

# What a model directory needs; never *.bin / *.pt pickles (the loader refuses them anyway).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "merges.txt", "vocab.json"]
_TRUE = ("1", "true", "yes", "on")


class ModelNotFoundError(FileNotFoundError):
    """No local directory, cached snapshot or download for a model; the message says where to
    put the weights."""


@dataclass(frozen=True)
class HubEnv:
    """The environment variables that steer model resolution, read at call time."""

    cache_dir: Path
    offline_reason: str | None  # why downloads are off, or None when they are allowed


def read_hub_env() -> HubEnv:
    """Where this module reads the environment: Hugging Face's variables here, ours through
    envs (HF_HUB_CACHE, HF_HOME, offline flags).
    huggingface_hub reads the same variables only once at import, so we pass them explicitly."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache = str(Path(env.get("HF_HOME") or Path(xdg) / "huggingface") / "hub")
    ours = envs.offline_flag()
    reason = None if ours is None else f"downloading is off (INFERENCE_PIO_OFFLINE={ours})"
    hf_offline = env.get("HF_HUB_OFFLINE", "")
    if hf_offline.strip().lower() in _TRUE:
        reason = f"downloading is off (HF_HUB_OFFLINE={hf_offline})"
    return HubEnv(cache_dir=Path(cache).expanduser(), offline_reason=reason)


def resolve_model(name_or_path: str, *, revision: str | None = None,
                  allow_download: bool | None = None, cache_dir: str | Path | None = None
                  ) -> Path:
    """A local model directory for `name_or_path` (a directory, or an ORG/NAME repo id).

    allow_download None means: allowed unless HF_HUB_OFFLINE=1 or INFERENCE_PIO_OFFLINE=1."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    repo_id = _check_repo_id(name_or_path, local)
    env = read_hub_env()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else env.cache_dir
    cached = _cached_snapshot(repo_id, revision, cache)
    reason = env.offline_reason if allow_download is None else (
        None if allow_download else "downloading is off (allow_download=False)")
    if cached is not None and (reason is not None or _is_complete(cached)):
        return cached  # an incomplete snapshot is still returned offline: the loader names the gap
    if reason is None:
        try:
            return _download(repo_id, revision, cache)
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise ModelNotFoundError(
                f"the Hugging Face Hub has no {repo_id}{'@' + revision if revision else ''} "
                f"({_first_line(e)}); check the name, or set HF_TOKEN for a gated or private "
                "repository") from e
        except Exception as e:  # network failures come in many types
            if cached is not None:
                return cached  # partial is better than nothing: the loader names what is missing
            reason = f"the download failed ({type(e).__name__}: {_first_line(e)})"
            raise ModelNotFoundError(_not_found_message(repo_id, revision, cache, reason)) from e
    raise ModelNotFoundError(_not_found_message(repo_id, revision, cache, reason))


def _check_repo_id(name: str, local: Path) -> str:
    if local.exists():
        raise ModelNotFoundError(f"{local} is a file; pass the model directory that holds "
                                 "config.json and the *.safetensors weights")
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") != 1
    try:
        if not looks_like_path:
            validate_repo_id(name)
            return name
    except HFValidationError:
        pass
    if name.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"model directory {local} does not exist")
    raise ModelNotFoundError(
        f"{name!r} is neither an existing directory nor a Hugging Face repo id of the form "
        "ORG/NAME (e.g. Qwen/Qwen3-Coder-30B-A3B-Instruct)")


def _cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The cached snapshot folder of `revision` (a branch, tag or full commit hash), if any."""
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                   local_files_only=True)
    except Exception:  # noqa: BLE001 - "not cached" is spelled differently across versions
        return None
    folder_path = Path(folder)
    return folder_path if (folder_path / "config.json").is_file() else None


def _is_complete(folder: Path) -> bool:
    """Whether a snapshot holds config.json and every weight file its index names."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return (folder / "model.safetensors").is_file()
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    return all((folder / shard).is_file() for shard in shards)


def _download(repo_id: str, revision: str | None, cache: Path) -> Path:
    folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                    allow_patterns=ALLOW_PATTERNS))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the repository has no config.json at {folder}")
    return folder


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _not_found_message(repo_id: str, revision: str | None, cache: Path, reason: str) -> str:
    rev = f" --revision {revision}" if revision else ""
    cache_folder = cache / f"models--{repo_id.replace('/', '--')}"
    return (
        f"cannot find model {repo_id}: it is not a local directory, it is not in the Hugging Face "
        f"cache ({cache}), and {reason}; running offline, nothing was downloaded.\n"
        "Put the weights on disk, on a machine with network access if this one has none:\n"
        f"    hf download {repo_id}{rev} --local-dir DIR\n"
        f"    (older huggingface_hub: huggingface-cli download {repo_id}{rev} --local-dir DIR)\n"
        "then copy DIR here and pass --model DIR. Or fill the cache instead (the same command "
        f"without --local-dir, with HF_HUB_CACHE={cache}), which puts the model under "
        f"{cache_folder}.")
