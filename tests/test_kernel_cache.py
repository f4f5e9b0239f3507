"""The native-kernel cache, through `pio warmup` (a subprocess of the installed entry point)
and kernels.build: a read-only cache holding the library is used without writing, an unwritable
cache falls back to a per-user temporary one, a build lock whose holder died never blocks, and a
torch lock file left by an interrupted build is cleared with a message. The library is built
once per test session (the session cache of conftest.py) and copied, so no test compiles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inference_pio.kernels import build, cpu

SRC = Path(__file__).resolve().parents[1] / "src"
pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"no native kernels: {cpu.reason()}")


def _pio(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    pio = shutil.which("pio")
    cmd = [pio, *args] if pio else [sys.executable, "-m", "inference_pio", *args]
    full = {**os.environ, "PYTHONPATH": str(SRC), **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=timeout,
                          check=False)


def _copy_library(cache: Path) -> Path:
    """cache/kernels/<name>/<name>.so, copied from this session's build; returns its folder."""
    built = cpu.library_dir()
    assert built is not None
    target = cache / "kernels" / cpu.build_name()
    target.mkdir(parents=True)
    lib = build.library_path(built, cpu.build_name())
    shutil.copy2(lib, target / lib.name)
    return target


def test_warmup_uses_a_read_only_cache_without_writing(tmp_path: Path) -> None:
    directory = _copy_library(tmp_path / "ro")
    for d in (directory, directory.parent, tmp_path / "ro"):
        d.chmod(0o555)
    before = sorted(p.name for p in directory.iterdir())
    try:
        r = _pio("warmup", "--json", env={"INFERENCE_PIO_CACHE": str(tmp_path / "ro"),
                                          "CXX": "no-such-compiler-xyz"})  # none needed
    finally:
        for d in (tmp_path / "ro", directory.parent, directory):
            d.chmod(0o755)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["available"] and not result["built"]
    assert result["directory"] == str(directory)
    assert sorted(p.name for p in directory.iterdir()) == before  # nothing written
    assert "Traceback" not in r.stderr


def test_unwritable_cache_falls_back_to_a_per_user_temp_cache(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"INFERENCE_PIO_CACHE": str(blocker / "cache"), "TMPDIR": str(tmpdir)}
    fallback = tmpdir / f"inference_pio-{os.getuid()}" / "kernels" / cpu.build_name()
    fallback.parent.mkdir(parents=True)
    shutil.copytree(cpu.library_dir(), fallback)  # type: ignore[arg-type]  # a prior fallback build
    r = _pio("warmup", env=env)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "PermissionError" not in r.stderr
    assert "is not writable" in r.stderr and str(fallback) in r.stderr
    assert r.stdout.startswith(f"native CPU kernels ready in {fallback}")


def test_a_build_lock_whose_holder_died_does_not_block(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys, time\nfrom pathlib import Path\n"
         "from inference_pio.kernels.build import build_lock\n"
         f"with build_lock(Path({str(tmp_path)!r})):\n"
         "    print('held', flush=True); time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert (tmp_path / build.LOCK_NAME).read_text().strip() == str(holder.pid)
        (tmp_path / build.TORCH_LOCK_NAME).write_text("")  # what a killed torch build leaves
    finally:
        holder.kill()  # SIGKILL, as an interrupted build that never ran its cleanup
        holder.wait()
    start = time.monotonic()
    with build.build_lock(tmp_path):
        assert time.monotonic() - start < 5
        assert not (tmp_path / build.TORCH_LOCK_NAME).exists()  # cleared: torch would wait on it
        assert (tmp_path / build.LOCK_NAME).read_text().strip() == str(os.getpid())


def test_first_build_clears_a_stale_lock_and_reports_progress(tmp_path: Path) -> None:
    """An interrupted build's leftovers (torch's lock, objects, no library): the next warmup
    finishes (relinking this session's objects), says it cleared the lock, and prints the
    progress and finished lines."""
    directory = tmp_path / "kernels" / cpu.build_name()
    shutil.copytree(cpu.library_dir(), directory)  # type: ignore[arg-type]
    build.library_path(directory, cpu.build_name()).unlink()
    (directory / build.TORCH_LOCK_NAME).write_text("")
    (directory / build.LOCK_NAME).write_text("999999999\n")  # a dead holder's pid
    r = _pio("warmup", "--json", env={"INFERENCE_PIO_CACHE": str(tmp_path)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["built"] is True
    assert "interrupted build" in r.stderr
    assert "building the native CPU kernels into" in r.stderr
    assert "built the native CPU kernels in" in r.stderr
    assert not (directory / build.TORCH_LOCK_NAME).exists()
