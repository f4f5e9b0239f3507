"""Replays issue 12's probe against a real `pio serve` (a subprocess on a loopback port): a clean
round of streaming chat clients, then the same round with hostile requests fired alongside
and slow connections held open, and compares.

    python benchmarks/bench_server_hostile.py                      # embedded tiny model
    python benchmarks/bench_server_hostile.py --streams 32 --slow 24 --model /path/to/checkpoint

Each round reports: 5xx responses (client side, and the server's own /metrics; target 0),
streams that ended properly (finish_reason "length", usage of --max-tokens, [DONE]), p50/p99
latency of `GET /health` polled every 0.1 s, p99 gap between a stream's chunks, and the KV
blocks still in use once the round is over (target 0). The hostile round also reports each
hostile request's status codes and how long the server took to close the slow connections
(its --header-timeout and --body-timeout). Exits 1 when a target is missed."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import _common as common
import httpx

CHAT = "/v1/chat/completions"
HOSTILE: list[tuple[str, str, dict[str, str], bytes]] = [
    # (name, path, extra headers, raw body): each answered 4xx, or 200 where the value is legal
    ("stop id 1e9 + min_tokens", "/v1/completions", {}, json.dumps(
        {"prompt": "x", "max_tokens": 4, "stop_token_ids": [10**9], "min_tokens": 2}).encode()),
    ("top_k 2**63", "/v1/completions", {}, json.dumps(
        {"prompt": "x", "max_tokens": 4, "top_k": 2**63}).encode()),
    ("temperature 1e308", "/v1/completions", {}, json.dumps(
        {"prompt": "x", "max_tokens": 4, "temperature": 1e308}).encode()),
    ("max_tokens 1e9", "/v1/completions", {}, json.dumps(
        {"prompt": "x", "max_tokens": 10**9}).encode()),
    ("max_tokens null", CHAT, {}, json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": None}).encode()),
    ("surrogate prompt", "/v1/completions", {}, b'{"prompt": "abc\\ud800def", "max_tokens": 2}'),
    ("surrogate message", CHAT, {},
     b'{"messages": [{"role": "user", "content": "abc\\ud800def"}], "max_tokens": 2}'),
    ("surrogate tokenize", "/tokenize", {}, b'{"prompt": "abc\\udc00"}'),
    ("3.9 MB one-word prompt", "/v1/completions", {}, json.dumps(
        {"prompt": "x" * 3_900_000, "max_tokens": 2}).encode()),
    ("invalid JSON", "/v1/completions", {}, b'{"prompt": '),
    ("text/plain POST", "/v1/completions", {"content-type": "text/plain"},
     b'{"prompt": "x", "max_tokens": 2}'),
    ("cross-origin text/plain", "/v1/completions",
     {"content-type": "text/plain", "origin": "http://evil.example"},
     b'{"prompt": "x", "max_tokens": 2}'),
    ("DNS-rebinding Host", "/v1/completions", {"host": "rebind.attacker.example"},
     b'{"prompt": "x", "max_tokens": 2}'),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    pio = shutil.which("pio")
    cmd = [pio] if pio else [sys.executable, "-m", "inference_pio"]
    cmd += ["serve", "--port", str(port), "--default-max-tokens", str(args.default_max_tokens),
            "--log-level", "error"]
    cmd += ["--model", args.model] if args.model else []
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(args.server_log, "wb"))


def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"pio serve exited with {proc.returncode}; see its log")
        try:
            if httpx.get(f"{base}/health", trust_env=False, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"pio serve not healthy after {timeout:.0f} s")


def metrics(base: str) -> dict[str, float]:
    """pio_requests_total 5xx, KV blocks in use, running and waiting requests."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", trust_env=False, timeout=10).text
    out = {"server_5xx": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pio_requests_total" and s.labels.get("status", "").startswith("5"):
                out["server_5xx"] += s.value
            elif s.name in ("pio_kv_cache_used_blocks", "pio_num_requests_running",
                            "pio_num_requests_waiting"):
                out[s.name] = s.value
    return out


async def stream(http: httpx.AsyncClient, i: int, max_tokens: int, gaps: list[float]
                 ) -> tuple[int, bool]:
    body = {"messages": [{"role": "user", "content": f"Client {i}: write a prime sieve."}],
            "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    finish = tokens = None
    done, last = False, None
    async with http.stream("POST", CHAT, json=body) as r:
        if r.status_code != 200:
            return r.status_code, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            if line == "data: [DONE]":
                done = True
                continue
            payload = json.loads(line[6:])
            for choice in payload.get("choices") or []:
                finish = choice.get("finish_reason") or finish
            if payload.get("usage"):
                tokens = payload["usage"]["completion_tokens"]
    return 200, done and finish == "length" and tokens == max_tokens


async def poll_health(http: httpx.AsyncClient, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await http.get("/health")
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.1)


async def hostile_loop(http: httpx.AsyncClient, stop: asyncio.Event,
                       codes: dict[str, Counter[int]]) -> None:
    while not stop.is_set():
        for name, path, headers, body in HOSTILE:
            h = {"content-type": "application/json", **headers}
            r = await http.post(path, content=body, headers=h)
            codes.setdefault(name, Counter())[r.status_code] += 1
        codes.setdefault("upload dropped midway", Counter())[await drop_upload(http)] += 1


async def drop_upload(http: httpx.AsyncClient) -> int:
    """Announce 100 kB, send 1 kB, hang up; 0 = no status to see (the client left)."""
    host, port = str(http.base_url.host), int(http.base_url.port or 80)
    _, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nContent-Length: 100000\r\n\r\n" + b"{" * 1000)
    await writer.drain()
    writer.close()
    return 0


async def slow_connection(host: str, port: int, body: bool, hold_s: float) -> float:
    """Trickle a request (headers, or after them the body) one byte a second; seconds until
    the server closed the connection (hold_s if it never did)."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: 1000\r\n\r\n")
    t0 = time.perf_counter()
    if body:
        writer.write(head)
    trickle = b"{" * 1000 if body else head
    try:
        for byte in trickle:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                await asyncio.wait_for(reader.read(1024), 1.0)  # an answer (408) or EOF
                return time.perf_counter() - t0
            except TimeoutError:
                pass
            if time.perf_counter() - t0 > hold_s:
                return hold_s
    except (ConnectionError, OSError):
        return time.perf_counter() - t0
    finally:
        writer.close()
    return time.perf_counter() - t0


async def run_round(base: str, args: argparse.Namespace, hostile: bool) -> dict[str, Any]:
    gaps: list[float] = []
    health: list[float] = []
    codes: dict[str, Counter[int]] = {}
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=args.streams + 16)
    async with httpx.AsyncClient(base_url=base, trust_env=False, limits=limits,
                                 timeout=args.timeout) as http, \
            httpx.AsyncClient(base_url=base, trust_env=False, timeout=args.timeout) as side:
        background = [asyncio.create_task(poll_health(side, stop, health))]
        slow: list[asyncio.Task[float]] = []
        if hostile:
            background.append(asyncio.create_task(hostile_loop(side, stop, codes)))
            host, port = str(http.base_url.host), int(http.base_url.port or 80)
            slow = [asyncio.create_task(slow_connection(host, port, k % 2 == 1, args.hold))
                    for k in range(args.slow)]
        results = await asyncio.gather(*(stream(http, i, args.max_tokens, gaps)
                                         for i in range(args.streams)))
        closed = await asyncio.gather(*slow)
        stop.set()
        await asyncio.gather(*background)
    stream_codes = Counter(code for code, _ in results)
    client_5xx = sum(n for code, n in stream_codes.items() if code >= 500)
    client_5xx += sum(n for c in codes.values() for code, n in c.items() if code >= 500)
    return {"streams_ok": sum(ok for _, ok in results), "stream_codes": dict(stream_codes),
            "client_5xx": client_5xx, "health_p50_ms": common.percentile(health, 0.5) * 1e3,
            "health_p99_ms": common.percentile(health, 0.99) * 1e3, "health_polls": len(health),
            "chunk_gap_p99_ms": common.percentile(gaps, 0.99) * 1e3,
            "hostile_codes": {k: dict(v) for k, v in codes.items()},
            "slow_header_closed_s": sorted(round(c, 1) for c in closed[0::2]),
            "slow_body_closed_s": sorted(round(c, 1) for c in closed[1::2])}


def wait_drained(base: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base)
        busy = (m.get("pio_kv_cache_used_blocks", 0) + m.get("pio_num_requests_running", 0)
                + m.get("pio_num_requests_waiting", 0))
        if busy == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded tiny one)")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slow", type=int, default=24, help="slow connections (half headers, "
                    "half bodies)")
    ap.add_argument("--hold", type=float, default=60.0, help="longest a slow client waits")
    ap.add_argument("--default-max-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--server-log", default=os.devnull)
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        wait_healthy(base, proc, 900)
        report: dict[str, Any] = {"load_avg_start": os.getloadavg()[0]}
        for name, hostile in (("clean", False), ("hostile", True)):
            before = metrics(base)["server_5xx"]
            r = asyncio.run(run_round(base, args, hostile))
            after = wait_drained(base, 30)
            r["server_5xx"] = after["server_5xx"] - before
            r["kv_blocks_after"] = after.get("pio_kv_cache_used_blocks")
            r["load_avg"] = os.getloadavg()[0]
            report[name] = r
    finally:
        proc.terminate()
        report_exit = proc.wait(timeout=60)
    report["server_exit"] = report_exit
    for name in ("clean", "hostile"):
        r = report[name]
        print(f"{name:8} streams ok {r['streams_ok']}/{args.streams}, 5xx client {r['client_5xx']}"
              f" server {r['server_5xx']:.0f}, /health p50 {r['health_p50_ms']:.1f} ms p99 "
              f"{r['health_p99_ms']:.1f} ms ({r['health_polls']} polls), chunk gap p99 "
              f"{r['chunk_gap_p99_ms']:.1f} ms, KV blocks after {r['kv_blocks_after']:.0f}, "
              f"load {r['load_avg']:.1f}")
    hostile = report["hostile"]
    for name, codes in hostile["hostile_codes"].items():
        print(f"  {name:28} {codes}")
    print(f"  slow headers closed after (s): {hostile['slow_header_closed_s']}")
    print(f"  slow bodies closed after (s): {hostile['slow_body_closed_s']}")
    print(f"pio serve exit status after SIGTERM: {report_exit}")
    print(json.dumps(report))
    missed = [name for name in ("clean", "hostile")
              if report[name]["client_5xx"] or report[name]["server_5xx"]
              or report[name]["kv_blocks_after"] or report[name]["streams_ok"] != args.streams]
    return 1 if missed or report_exit != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
