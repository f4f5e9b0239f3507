"""Thread policy (runtime/threads.py) through `LLM(num_threads=...)`, the environment variable
and `pio generate --threads` (a subprocess), and the per-run summary line / --json timings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from inference_pio import LLM
from inference_pio.config import ConfigError
from inference_pio.runtime.threads import ENV_VAR, SMALL_MODEL_BYTES, busy_cpus, choose_threads

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_policy_one_thread_for_small_models_free_cores_for_large() -> None:
    small, large = SMALL_MODEL_BYTES // 2, SMALL_MODEL_BYTES * 8
    assert choose_threads(None, small, cpus=8, busy=0.0).threads == 1
    assert choose_threads(None, large, cpus=2, busy=0.1).threads == 2
    assert choose_threads(None, large, cpus=2, busy=1.2).threads == 1  # a busy neighbour
    assert choose_threads(None, large, cpus=8, busy=3.0).threads == 5
    assert choose_threads(None, large, cpus=2, busy=9.0).threads == 1  # never below one
    assert choose_threads(3, small, cpus=2, busy=0.0).threads == 3  # a request wins
    assert choose_threads(None, None, cpus=4, busy=0.0).threads == 4  # unknown size: large


def test_busy_cpus_does_not_count_this_process() -> None:
    """Our own work (a thread spinning during the sample) is not another process's."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    seen = []
    for _ in range(3):  # other processes come and go: one clean pair of samples is enough
        quiet = busy_cpus()
        stop.clear()
        spinner = threading.Thread(target=spin)
        spinner.start()
        try:
            loaded = busy_cpus()
        finally:
            stop.set()
            spinner.join()
        seen.append((quiet, loaded))
        if loaded < quiet + 0.6:  # counting the spinner would add about 1.0
            return
    raise AssertionError(f"our own spinning thread was counted as busy: {seen}")


def test_llm_applies_num_threads_and_says_why(tiny_moe_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(tiny_moe_dir, num_threads=1, progress=False, kv_cache_memory=2**20)
    assert torch.get_num_threads() == 1 and llm.threads.threads == 1
    assert llm.threads.reason == "requested"
    monkeypatch.setenv(ENV_VAR, "2")
    llm = LLM(tiny_moe_dir, progress=False, kv_cache_memory=2**20)
    assert torch.get_num_threads() == 2 and llm.threads.reason == "requested"
    monkeypatch.delenv(ENV_VAR)
    llm = LLM(tiny_moe_dir, progress=False, kv_cache_memory=2**20)
    assert llm.threads.threads == 1 and llm.threads.reason.startswith("auto")  # tiny model


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5])
def test_llm_rejects_a_bad_thread_count(bad: object) -> None:
    with pytest.raises(ConfigError, match="num_threads"):
        LLM("/nonexistent-model-dir", num_threads=bad)  # checked before the model is looked up


def _pio(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    pio = shutil.which("pio")
    cmd = [pio, *args] if pio else [sys.executable, "-m", "inference_pio", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": str(SRC), **(env or {})})


def test_generate_prints_the_run_summary_and_json_timings(tiny_moe_dir: Path) -> None:
    r = _pio("generate", "--model", str(tiny_moe_dir), "--raw", "--prompt", "def f():",
             "--max-tokens", "4", "--ignore-eos", "--temperature", "0", "--threads", "1",
             "--json")
    assert r.returncode == 0, r.stderr
    timings = json.loads(r.stdout)["timings"]
    assert timings["threads"] == 1 and timings["generated_tokens"] == 4
    assert timings["prompt_tokens"] > 0 and timings["time_to_first_token_s"] >= 0
    assert timings["decode_tokens_per_s"] > 0
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("prompt ")]
    assert len(line) == 1, r.stderr
    assert "generated 4 tok in" in line[0] and "TTFT" in line[0] and line[0].endswith("1 thread")


def test_generate_streamed_summary_and_bad_threads(tiny_moe_dir: Path) -> None:
    r = _pio("generate", "--model", str(tiny_moe_dir), "--raw", "--prompt", "x",
             "--max-tokens", "3", "--ignore-eos", env={ENV_VAR: "1"})
    assert r.returncode == 0, r.stderr
    assert any(ln.startswith("prompt ") and "generated 3 tok" in ln
               for ln in r.stderr.splitlines()), r.stderr
    bad = _pio("generate", "--model", str(tiny_moe_dir), "--prompt", "x", "--threads", "0")
    assert bad.returncode == 2 and "--threads" in bad.stderr and "Traceback" not in bad.stderr
