"""Building and loading the native-kernel library in a cache directory, safely.

Contract of `load_library(directory, name, sources, cflags, ldflags)`:
- A directory that already holds `<name>.so` is loaded from directly (dlopen only: no compiler,
  no lock, no write), so a read-only cache prepared ahead of time (`pio warmup`) works. The name
  is a hash of the sources, flags and torch version, so an existing file is the right build.
- Otherwise the library is built under an exclusive `flock` on `<directory>/build.pid.lock`,
  which the OS releases when its holder dies (Ctrl-C, kill -9): an interrupted build never
  blocks the next one. The holder's pid is written in the file, for the waiting message.
  Holding the flock, a leftover torch `lock` file (torch's own build baton, left behind by a
  build that was killed) is known to be stale: it is removed, with a message, instead of
  making torch wait on it forever.
- A directory that cannot be created or written falls back to a per-user temporary cache
  (`$TMPDIR/inference_pio-<uid>/kernels/<name>`) with a warning naming both; if that fails too,
  BuildError says which directories were tried and how to fix it (INFERENCE_PIO_CACHE).
- Building logs one line before (with an estimate: the last build's time on this machine, else
  the range measured on a 2-core machine) and one after, with the elapsed time.
Imports torch lazily (only to compile and load)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = "build.pid.lock"
TORCH_LOCK_NAME = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory
TIMING_NAME = "last_build_seconds"  # in the parent (kernels/) directory: survives new hashes
# Measured here: 21-27 s on a 2-core AMD EPYC with load average ~1 (3 sources compiled in
# parallel by ninja); issue 11 reports ~107 s on such a machine with its cores busy.
DEFAULT_ESTIMATE = "usually 20-110 s: longer when other processes keep the cores busy"


class BuildError(RuntimeError):
    """The library could be neither loaded nor built; the message names the fix."""


def library_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.so"


def fallback_dir(name: str) -> Path:
    """The per-user temporary cache used when the configured one is not writable."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"inference_pio-{uid}" / "kernels" / name


def _writable(directory: Path) -> str | None:
    """None when `directory` exists (created if needed) and accepts a new file; else why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as e:
        return f"{e.strerror or e} ({directory})"
    return None


def _try_load(path: Path) -> bool:
    """dlopen `path` and register its ops; False (logged) when it is not a loadable library."""
    import torch

    try:
        torch.ops.load_library(str(path))
    except OSError as e:  # a truncated or foreign file: rebuild it
        logger.warning("could not load %s (%s); rebuilding it", path, e)
        return False
    return True


def estimate(directory: Path) -> str:
    """The expected build time: the last build's on this machine, else DEFAULT_ESTIMATE."""
    with contextlib.suppress(OSError, ValueError):
        seconds = float((directory.parent / TIMING_NAME).read_text())
        return f"about {seconds:.0f} s (the last build here took that long)"
    return DEFAULT_ESTIMATE


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Hold the exclusive build lock of `directory` (see the module docstring)."""
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            logger.info("waiting for process %s, which is building the native kernels in %s",
                        owner, directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        stale = directory / TORCH_LOCK_NAME
        if stale.exists():
            logger.warning("removing %s: a build lock left by an interrupted build (no process "
                           "holds the build lock now)", stale)
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the flock


def _compile(directory: Path, name: str, sources: Sequence[Path], cflags: Sequence[str],
             ldflags: Sequence[str]) -> None:
    from torch.utils.cpp_extension import load

    logger.info("building the native CPU kernels into %s (once per torch version; %s; "
                "`pio warmup` does this ahead of time)", directory, estimate(directory))
    start = time.perf_counter()
    load(name=name, sources=[str(s) for s in sources], extra_cflags=list(cflags),
         extra_ldflags=list(ldflags), build_directory=str(directory), is_python_module=False,
         verbose=False)
    elapsed = time.perf_counter() - start
    with contextlib.suppress(OSError):
        (directory.parent / TIMING_NAME).write_text(f"{elapsed:.1f}\n")
    logger.info("built the native CPU kernels in %.0f s", elapsed)


def load_library(directory: Path, name: str, sources: Sequence[Path], cflags: Sequence[str],
                 ldflags: Sequence[str]) -> tuple[Path, bool]:
    """Load `<directory>/<name>.so`, building it first if needed (see the module docstring);
    returns (the directory actually used, whether it was built now). Raises BuildError (or the
    compiler's error)."""
    problems: list[str] = []
    for i, target in enumerate((directory, fallback_dir(name))):
        lib = library_path(target, name)
        if lib.is_file() and _try_load(lib):
            return target, False
        problem = _writable(target)
        if problem is not None:
            problems.append(problem)
            if i == 0:
                logger.warning("the kernel cache %s is not writable (%s); using %s instead (set "
                               "INFERENCE_PIO_CACHE to a writable directory to keep the build)",
                               target, problem, fallback_dir(name))
            continue
        with build_lock(target):
            if lib.is_file() and _try_load(lib):  # built by the process we waited for
                return target, False
            with contextlib.suppress(FileNotFoundError):
                lib.unlink()  # not loadable: make ninja relink it
            _compile(target, name, sources, cflags, ldflags)
        return target, True
    raise BuildError("no writable directory for the native kernels: " + "; ".join(problems)
                     + ". Set INFERENCE_PIO_CACHE to a writable directory, or run `pio warmup` "
                     "once as a user who can write the cache")
