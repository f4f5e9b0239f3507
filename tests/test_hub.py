"""models.hub.resolve_model against a fake Hugging Face cache built in tmp; the network is never
touched (a guard fails any call that would download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub.utils import RepositoryNotFoundError

from inference_pio.models import hub
from inference_pio.models.hub import ModelNotFoundError, read_hub_env, resolve_model
from inference_pio.models.loader import load_model
from inference_pio.testing import tiny_moe_config, write_random_checkpoint

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "Qwen/Qwen3-Coder-30B-A3B-Instruct"
_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
        "INFERENCE_PIO_OFFLINE")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache selected by HF_HUB_CACHE, and a guard against any download."""
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    real = hub.snapshot_download

    def local_only(repo_id: str, **kwargs: Any) -> str:
        assert kwargs.get("local_files_only"), "a test tried to download"
        return real(repo_id, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", local_only)
    return tmp_path / "hf-cache"


def _add_to_cache(cache: Path, repo_id: str = REPO, ref: str = "main",
                  weights: bool = True) -> Path:
    """Lay out models--ORG--NAME/{refs/REF, snapshots/SHA/...} as huggingface_hub does."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    if weights:
        write_random_checkpoint(snapshot, tiny_moe_config(vocab_size=512), tokenizer=False)
    else:
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps(tiny_moe_config().to_hf()))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(SHA)
    return snapshot


def _fake_download(monkeypatch: pytest.MonkeyPatch, cache: Path,
                   error: Exception | None = None) -> list[dict[str, Any]]:
    """Replace snapshot_download: local lookups find nothing; downloads record their arguments
    and either raise `error` or fill the cache."""
    calls: list[dict[str, Any]] = []

    def fake(repo_id: str, **kwargs: Any) -> str:
        if kwargs.get("local_files_only"):
            raise FileNotFoundError("not cached")
        calls.append({"repo_id": repo_id, **kwargs})
        if error is not None:
            raise error
        return str(_add_to_cache(Path(kwargs["cache_dir"]), repo_id))

    monkeypatch.setattr(hub, "snapshot_download", fake)
    return calls


# ---- local directories and the cache ----------------------------------------------------

def test_local_directory_wins_over_cache(cache: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _add_to_cache(cache)
    local = tmp_path / "work" / REPO
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_model(REPO) == Path(REPO)
    assert resolve_model(str(local)) == local


def test_found_in_cache_and_loadable(cache: Path) -> None:
    snapshot = _add_to_cache(cache)
    assert resolve_model(REPO) == snapshot
    _, config = load_model(resolve_model(REPO), progress=False)
    assert config.vocab_size == 512


def test_hf_home_is_respected(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
                              ) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert read_hub_env().cache_dir == tmp_path / "home" / "hub"
    snapshot = _add_to_cache(tmp_path / "home" / "hub")
    assert resolve_model(REPO) == snapshot


def test_cache_dir_argument_overrides_env(tmp_path: Path, cache: Path) -> None:
    snapshot = _add_to_cache(tmp_path / "other")
    assert resolve_model(REPO, cache_dir=tmp_path / "other") == snapshot


def test_revision_by_tag_and_commit(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = _add_to_cache(cache, ref="v1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(REPO, revision="v1") == snapshot
    assert resolve_model(REPO, revision=SHA) == snapshot
    with pytest.raises(ModelNotFoundError, match="--revision main"):
        resolve_model(REPO, revision="main")


def test_incomplete_snapshot_downloads_when_allowed(cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = _add_to_cache(cache, weights=False)
    monkeypatch.setenv("INFERENCE_PIO_OFFLINE", "1")
    assert resolve_model(REPO) == snapshot  # offline: the loader will name what is missing
    monkeypatch.delenv("INFERENCE_PIO_OFFLINE")
    real = hub.snapshot_download
    calls: list[dict[str, Any]] = []

    def fake(repo_id: str, **kwargs: Any) -> str:
        if not kwargs.get("local_files_only"):
            calls.append(kwargs)
            write_random_checkpoint(snapshot, tiny_moe_config(vocab_size=512), tokenizer=False)
        return real(repo_id, **{**kwargs, "local_files_only": True, "allow_patterns": None})

    monkeypatch.setattr(hub, "snapshot_download", fake)
    assert resolve_model(REPO) == snapshot and len(calls) == 1


def test_incomplete_snapshot_kept_when_download_fails(cache: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = _add_to_cache(cache, weights=False)
    real = hub.snapshot_download

    def no_network(repo_id: str, **kwargs: Any) -> str:
        if not kwargs.get("local_files_only"):
            raise ConnectionError("offline")
        return real(repo_id, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", no_network)
    assert resolve_model(REPO) == snapshot


# ---- downloads --------------------------------------------------------------------------

def test_download_uses_safe_patterns(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_download(monkeypatch, cache)
    path = resolve_model(REPO, revision="main")
    assert (path / "config.json").is_file()
    (call,) = calls
    assert call["repo_id"] == REPO and call["revision"] == "main"
    assert Path(call["cache_dir"]) == cache
    patterns = call["allow_patterns"]
    for wanted in ("*.json", "*.safetensors", "*.jinja", "merges.txt", "vocab.json"):
        assert wanted in patterns
    assert not any(p.endswith((".bin", ".pt", "*")) and p != "tokenizer*" for p in patterns)


def test_allow_download_overrides_offline_env(cache: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = _fake_download(monkeypatch, cache)
    resolve_model(REPO, allow_download=True)
    assert len(calls) == 1


def test_download_failure_says_where_to_put_weights(cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    error = ConnectionError("Name or service not known")
    _fake_download(monkeypatch, cache, error)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(REPO)
    message = str(info.value)
    assert "download failed (ConnectionError: Name or service not known)" in message
    assert "offline" in message
    assert f"hf download {REPO} --local-dir DIR" in message and "--model DIR" in message
    assert info.value.__cause__ is error


def test_unknown_repository(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class NotFound(RepositoryNotFoundError):
        def __init__(self) -> None:  # the real one wants an HTTP response
            Exception.__init__(self, "404 Repository Not Found")

    _fake_download(monkeypatch, cache, NotFound())
    with pytest.raises(ModelNotFoundError, match=r"has no org/typo.*HF_TOKEN"):
        resolve_model("org/typo")


# ---- offline ----------------------------------------------------------------------------

@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "INFERENCE_PIO_OFFLINE"])
def test_offline_error_message(cache: Path, monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    monkeypatch.setenv(var, "1")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(REPO)
    message = str(info.value)
    assert f"{var}=1" in message and "offline" in message
    assert f"hf download {REPO} --local-dir DIR" in message
    assert f"huggingface-cli download {REPO} --local-dir DIR" in message
    assert "--model DIR" in message
    assert str(cache / "models--Qwen--Qwen3-Coder-30B-A3B-Instruct") in message


def test_allow_download_false(cache: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"allow_download=False"):
        resolve_model(REPO, allow_download=False)


def test_offline_flag_spellings(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    for value, offline in (("1", True), ("true", True), ("ON", True), ("0", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert (read_hub_env().offline_reason is not None) is offline, value


# ---- bad names --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["not a repo", "a/b/c", "org--x/y", "justaname"])
def test_invalid_names(cache: Path, name: str) -> None:
    with pytest.raises(ModelNotFoundError, match="neither an existing directory nor"):
        resolve_model(name, allow_download=False)


def test_missing_path_and_file(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(str(tmp_path / "weights.safetensors"))
