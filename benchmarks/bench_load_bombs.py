"""Hostile checkpoints (issue 12 item 6): how long until they are refused, and at what cost.

    python benchmarks/bench_load_bombs.py                        # all three parts
    python benchmarks/bench_load_bombs.py --parts views --layers 2000 5000   # one part

Parts (each row is one measurement, printed as a table then one JSON line per part):
  refuse  LLM(dir) on a tiny checkpoint whose config.json claims --layers layers: seconds until
          the error (it used to build the whole model's views first, quadratically).
  views   build_model_meta(tiny config with N layers) then `.checkpoint_views()`: seconds of
          each. Run it with PYTHONPATH pointing at an older tree to time the old code.
  bombs   chat-template bombs rendered through `render_chat_template`, each in a fresh Python
          process: seconds until refused (or rendered) and that process's peak RSS."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common
import torch

from inference_pio.models.qwen3_moe import build_model_meta
from inference_pio.testing import tiny_moe_config, write_random_checkpoint

BOMBS = {
    "baseline_plain_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "nested_loops_no_output": "{% for a in range(100000) %}{% for b in range(100000) %}"
                              "{% endfor %}{% endfor %}",
    "100MB_output": "{% for a in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "repeat_10GB": "{{ 'x' * 10**10 }}",
    "doubling_concat": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
}

_BOMB_CHILD = """
import json, sys, time
from inference_pio.chat_template import render_chat_template
t0 = time.perf_counter()
try:
    render_chat_template(sys.argv[1], [{"role": "user", "content": "hi"}])
    outcome = "rendered"
except Exception as e:
    outcome = type(e).__name__
print(json.dumps({"seconds": round(time.perf_counter() - t0, 3), "outcome": outcome,
                  # VmHWM: this process's own peak (ru_maxrss would carry the parent's across exec)
                  "peak_rss_mb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
                  // 1024}))
"""


def bench_refuse(layers: list[int], tmp: Path) -> list[dict[str, object]]:
    from inference_pio.llm import LLM

    base = write_random_checkpoint(tmp / "base", tiny_moe_config(vocab_size=512), dtype="float32",
                                   tokenizer=False)
    rows = []
    for n in layers:
        model_dir = Path(shutil.copytree(base, tmp / f"layers{n}"))
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": n}))
        t0 = time.perf_counter()
        try:
            LLM(str(model_dir), dtype="float32", progress=False)
            outcome = "loaded"
        except ValueError as e:
            outcome = type(e).__name__
        rows.append({"num_hidden_layers": n, "seconds_to_refuse": round(time.perf_counter() - t0, 3),
                     "outcome": outcome})
    return rows


def bench_views(layers: list[int]) -> list[dict[str, object]]:
    rows = []
    for n in layers:
        config = tiny_moe_config(vocab_size=512, num_hidden_layers=n)
        t0 = time.perf_counter()
        meta = build_model_meta(config, torch.float32)
        t1 = time.perf_counter()
        views = meta.checkpoint_views()
        t2 = time.perf_counter()
        rows.append({"num_hidden_layers": n, "build_meta_s": round(t1 - t0, 3),
                     "checkpoint_views_s": round(t2 - t1, 3), "tensors": len(views)})
    return rows


def bench_bombs() -> list[dict[str, object]]:
    rows = []
    for name, template in BOMBS.items():
        done = subprocess.run([sys.executable, "-c", _BOMB_CHILD, template], capture_output=True,
                              text=True, timeout=600, env=os.environ.copy(), check=True)
        rows.append({"bomb": name, **json.loads(done.stdout.strip().splitlines()[-1])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["refuse", "views", "bombs"],
                    choices=["refuse", "views", "bombs"])
    ap.add_argument("--layers", nargs="+", type=int, default=[2000, 5000, 20000])
    args = ap.parse_args()
    contention = common.Contention()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="pio-bombs-") as tmp:
        for part in args.parts:
            rows = {"refuse": lambda: bench_refuse(args.layers, Path(tmp)),
                    "views": lambda: bench_views(args.layers), "bombs": bench_bombs}[part]()
            print(f"== {part}")
            common.print_table(rows)
            print(json.dumps({"part": part, "rows": rows}))
    print(json.dumps(contention.report()))


if __name__ == "__main__":
    main()
