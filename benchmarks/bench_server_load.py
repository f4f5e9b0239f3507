"""Load test of the OpenAI-compatible server: concurrent streaming clients plus clients that
hang up after 0-3 events, against a real engine behind uvicorn on a loopback port.

    python benchmarks/bench_server_load.py                    # tiny random checkpoint, 32 + 8
    python benchmarks/bench_server_load.py --rounds 3 --endpoint completions
    python benchmarks/bench_server_load.py --model /path/to/checkpoint

Checks, each round: every stream not hung up ends with a finish_reason, a usage chunk of exactly
max_tokens tokens (ignore_eos) and `data: [DONE]`; no 5xx (client side and the server's own
/metrics); then, within --idle-timeout, the engine is idle with no request left and no KV block
referenced (a cached prefix block nobody holds sits in the free queue, so it counts as free).
Prints requests/s, p50/p99 end-to-end latency and time to first event, tokens/s; exits 1 when a
check fails."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import _common as common
import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from inference_pio.llm import LLM
from inference_pio.server import LLMEngineClient, build_app

MODEL = "bench-model"


@dataclass
class Result:
    hang_up_after: int | None = None  # events to read before closing the connection
    status: int = 0
    events: int = 0
    ttft: float | None = None  # first SSE event (the server answers once a token exists)
    e2e: float = 0.0
    finish_reason: str | None = None
    tokens: int | None = None  # usage.completion_tokens
    done: bool = False
    problem: str | None = None


def _body(args: argparse.Namespace, i: int, max_tokens: int) -> dict[str, Any]:
    text = f"Client {i}: write a Python function that returns the {i}th prime."
    body: dict[str, Any] = {"model": MODEL, "stream": True, "max_tokens": max_tokens,
                            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        return {**body, "messages": [{"role": "user", "content": text}]}
    return {**body, "prompt": text}


async def _client(http: httpx.AsyncClient, url: str, body: dict[str, Any], res: Result) -> None:
    t0 = time.perf_counter()
    try:
        async with http.stream("POST", url, json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.problem = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            if res.hang_up_after == 0:
                return  # leave as soon as the response started
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                res.events += 1
                res.ttft = time.perf_counter() - t0 if res.ttft is None else res.ttft
                if res.done:
                    res.problem = "data after [DONE]"
                elif line == "data: [DONE]":
                    res.done = True
                else:
                    payload = json.loads(line[6:])
                    if "error" in payload:
                        res.problem = f"error event: {payload['error']}"
                    for choice in payload.get("choices") or []:
                        res.finish_reason = choice.get("finish_reason") or res.finish_reason
                    if payload.get("usage"):
                        res.tokens = payload["usage"]["completion_tokens"]
                if res.hang_up_after is not None and res.events >= res.hang_up_after:
                    break  # leaving the block closes the half-read connection
    except (httpx.HTTPError, ValueError) as e:
        res.problem = f"{type(e).__name__}: {e}"
    res.e2e = time.perf_counter() - t0


async def _round(args: argparse.Namespace, base: str) -> tuple[list[Result], float]:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    # Hang-ups spread through the arrival order, so some are admitted in the first wave and
    # leave while other streams run (a request only answers once it has a token).
    total = args.clients + args.hang_ups
    spots = {k * total // args.hang_ups for k in range(args.hang_ups)} if args.hang_ups else set()
    results = [Result(hang_up_after=i % 4 if i in spots else None) for i in range(total)]
    limits = httpx.Limits(max_connections=len(results) + 8)
    async with httpx.AsyncClient(base_url=base, trust_env=False, limits=limits,
                                 timeout=args.round_timeout) as http:
        # Hang-ups ask for many tokens: one the server fails to abort keeps the engine busy.
        jobs = [_client(http, path, _body(args, i, args.max_tokens if r.hang_up_after is None
                                          else args.hang_up_max_tokens), r)
                for i, r in enumerate(results)]
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*jobs), args.round_timeout)
        return results, time.perf_counter() - t0


def _check_results(results: list[Result], max_tokens: int) -> list[str]:
    problems = []
    for i, r in enumerate(results):
        if r.problem is not None:
            problems.append(f"client {i}: {r.problem}")
        elif r.hang_up_after is None and not (r.done and r.finish_reason == "length"
                                              and r.tokens == max_tokens):
            problems.append(f"client {i}: incomplete stream (done={r.done}, finish_reason="
                            f"{r.finish_reason}, tokens={r.tokens}, want {max_tokens})")
        elif r.hang_up_after is not None and r.done:
            problems.append(f"client {i}: meant to hang up but the stream finished first")
    return problems


def _wait_idle(client: LLMEngineClient, timeout: float) -> tuple[float, list[str]]:
    """Seconds until the engine held no request and no referenced block (or the problems)."""
    sched, t0 = client.llm.engine.scheduler, time.perf_counter()
    while True:
        with client.engine._lock:  # a consistent snapshot, between two steps
            state = {"unfinished": client.llm.engine.has_unfinished_requests(),
                     "requests": len(sched.requests), "used_blocks": sched.num_used_blocks,
                     "stream_queues": len(client.engine._queues)}
            if not any(state.values()):
                try:
                    sched.check_invariants()
                except AssertionError as e:
                    return time.perf_counter() - t0, [f"scheduler invariants broken: {e!r}"]
                return time.perf_counter() - t0, []
        if time.perf_counter() - t0 > timeout:
            return timeout, [f"engine not idle after {timeout:.0f} s: {state}"]
        time.sleep(0.02)


def _server_5xx(base: str) -> int:
    text = httpx.get(f"{base}/metrics", trust_env=False, timeout=10).text
    return sum(int(s.value) for family in text_string_to_metric_families(text)
               if family.name == "pio_requests" for s in family.samples
               if s.name == "pio_requests_total" and s.labels["status"].startswith("5"))


def main() -> None:
    ap = common.make_parser(__doc__, preset_default="tiny", num_layers=False)
    ap.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    ap.add_argument("--clients", type=int, default=32, help="streams read to the end")
    ap.add_argument("--hang-ups", type=int, default=8, help="streams closed after 0-3 events")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hang-up-max-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--round-timeout", type=float, default=120.0, help="also per request")
    ap.add_argument("--idle-timeout", type=float, default=10.0)
    args = ap.parse_args()
    path, tmp = common.prepare_checkpoint(args.model, args.preset, dtype="float32")
    llm = LLM(str(path), dtype="float32", progress=False)
    client = LLMEngineClient(llm)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(build_app(client, model_name=MODEL), lifespan="on",
                                           log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    problems: list[str] = [] if server.started else ["uvicorn did not start"]
    results: list[Result] = []
    wall = idle_s = 0.0
    try:
        for n in range(args.rounds if server.started else 0):
            try:
                got, seconds = asyncio.run(_round(args, base))
            except TimeoutError:
                problems.append(f"round {n}: clients still running after {args.round_timeout} s")
                break
            results += got
            wall += seconds
            problems += [f"round {n}: {p}" for p in _check_results(got, args.max_tokens)]
            waited, idle_problems = _wait_idle(client, args.idle_timeout)
            idle_s = max(idle_s, waited)
            problems += [f"round {n}: {p}" for p in idle_problems]
        server_5xx = _server_5xx(base) if server.started else 0
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    statuses = Counter(r.status for r in results)
    client_5xx = sum(count for status, count in statuses.items() if status >= 500)
    if client_5xx or server_5xx:
        problems.append(f"5xx: {client_5xx} seen by clients, {server_5xx} counted by the server")
    done = [r for r in results if r.hang_up_after is None and r.done]
    e2e, ttft = [r.e2e for r in done], [r.ttft or 0.0 for r in done]
    tokens = sum(r.tokens or 0 for r in done)
    result = {"endpoint": args.endpoint, "rounds": args.rounds, "clients": args.clients,
              "hang_ups": args.hang_ups, "max_tokens": args.max_tokens,
              "completed": len(done), "hung_up": sum(r.hang_up_after is not None for r in results),
              "status_codes": {str(k): v for k, v in sorted(statuses.items())},
              "server_5xx": server_5xx, "wall_s": round(wall, 2),
              "requests_per_s": round(len(done) / wall, 2) if wall else 0.0,
              "gen_tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
              "e2e_p50_s": round(common.percentile(e2e, 0.5), 3),
              "e2e_p99_s": round(common.percentile(e2e, 0.99), 3),
              "ttft_p50_s": round(common.percentile(ttft, 0.5), 3),
              "ttft_p99_s": round(common.percentile(ttft, 0.99), 3),
              "max_idle_wait_s": round(idle_s, 3), "server_stopped": not thread.is_alive(),
              "ok": not problems and not thread.is_alive()}
    common.print_result(result, (f"FAIL {problem}" for problem in problems[:20]))
    if tmp is not None:
        tmp.cleanup()
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
