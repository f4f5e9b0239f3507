"""`pio serve` as users run it: the installed `pio` entry point in a subprocess on a free port
with the tiny model; /health (loading, then ok), the official `openai` client through several
served names, the serve flags (limits, allowed hosts, API key), then SIGTERM and exit 0."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
KEY = "sk-cli"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pio() -> list[str]:
    exe = shutil.which("pio")
    return [exe] if exe else [sys.executable, "-m", "inference_pio"]


def test_pio_serve_answers_openai_and_exits_cleanly(tiny_moe_dir: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "INFERENCE_PIO_API_KEY": KEY}
    cmd = [*_pio(), "serve", "--model", str(tiny_moe_dir), "--port", str(port),
           "--served-model-name", "qwen3-coder-30b", "coder", "--allowed-hosts", "box.lan",
           "--max-tokens-limit", "8", "--default-max-tokens", "3", "--dtype", "float32",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        status = None
        deadline = time.monotonic() + 900  # the first start builds the native kernels
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"{base}/health", trust_env=False, timeout=5).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            assert status in (None, 503), status
            time.sleep(0.5)
        assert status == 200, f"no healthy server: {proc.poll()}"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120,
                               http_client=httpx.Client(trust_env=False))
        ids = {m.id for m in client.models.list().data}
        assert {"qwen3-coder-30b", "coder", str(tiny_moe_dir), tiny_moe_dir.name} <= ids
        done = client.completions.create(model="qwen3-coder-30b", prompt="def f():",
                                         max_tokens=2, temperature=0)
        assert done.choices[0].finish_reason in ("length", "stop")
        chat = client.chat.completions.create(
            model=tiny_moe_dir.name, messages=[{"role": "user", "content": "hi"}],
            temperature=0, extra_body={"ignore_eos": True})
        assert chat.usage is not None and chat.usage.completion_tokens == 3  # the default
        with pytest.raises(openai.BadRequestError, match="max-tokens-limit"):
            client.completions.create(model="coder", prompt="x", max_tokens=9)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
        http = httpx.Client(base_url=base, trust_env=False, timeout=30)
        assert http.get("/health", headers={"Host": "box.lan"}).status_code == 200
        assert http.get("/health", headers={"Host": "rebind.attacker.example"}
                        ).status_code == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_pio_serve_bad_flag_is_one_line_before_loading(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for flags, word in ((["--default-max-tokens", "10", "--max-tokens-limit", "5"],
                         "--max-tokens-limit"),
                        (["--allowed-origins", "example.com"], "--allowed-origins"),
                        (["--port", "70000"], "port")):
        done = subprocess.run([*_pio(), "serve", "--model", str(tmp_path / "absent"), *flags],
                              env=env, capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == 2, done.stderr
        assert word in done.stderr and "Traceback" not in done.stderr, done.stderr
