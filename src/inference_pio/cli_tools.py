"""`pio info`, `pio quantize`, `pio bench` and `pio make-test-model`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from inference_pio.cli_common import UsageError, print_error


def cmd_info(args: argparse.Namespace) -> int:
    from inference_pio import model_info

    config, source = model_info.load_config(args.model, args.preset, revision=args.revision,
                                            offline=args.offline)
    summary = model_info.summarize(config, source, args.memory)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        model_info.print_tables(model_info.summary_tables(summary), sys.stdout)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from inference_pio.layers.quantization import QuantConfig, QuantizationError
    from inference_pio.llm import resolve_model_dir
    from inference_pio.models.quantize import quantize_checkpoint

    src, _ = resolve_model_dir(args.model, revision=args.revision,
                               allow_download=False if args.offline else None)
    try:
        quant = QuantConfig(args.quantization, group_size=args.group_size,
                            quantize_lm_head=args.quantize_lm_head)
    except QuantizationError as e:
        raise UsageError(str(e)) from None
    start = time.perf_counter()
    out = quantize_checkpoint(src, args.out, quant)
    size = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    print(f"wrote {src} as {quant.describe()} to {out}: {size / 2**30:.2f} GiB of weights in "
          f"{time.perf_counter() - start:.1f} s; load it with --model {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from inference_pio import bench_cli

    report = bench_cli.run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        bench_cli.print_report(report, sys.stdout)
    return 0


def cmd_make_test_model(args: argparse.Namespace) -> int:
    """Refuses a non-empty --out unless --force; the checkpoint is written into a new sibling
    directory first, which then replaces --out whole (no stale shards of an older one)."""
    out = Path(args.out).expanduser()
    _check_make_out(out, args.force)
    from inference_pio.testing import make_test_model

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; --out gets the usual mode
    try:
        make_test_model(staging, preset=args.preset, num_layers=args.num_layers,
                        seed=args.seed, dtype=args.dtype)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote a random-weight {args.preset} checkpoint to {out}")
    return 0


def _check_make_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory: give a new directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise UsageError(f"--out {out} is not empty: give a new directory, or add --force to "
                         "replace it whole")
    resolved = out.resolve()
    if resolved in (Path(resolved.anchor), Path.home().resolve(), Path.cwd().resolve()):
        raise UsageError(f"--force will not replace {resolved} (the root, home or current "
                         "directory): give a directory of its own")


def cmd_warmup(args: argparse.Namespace) -> int:
    from inference_pio.kernels import cpu

    result = cpu.warmup()
    if args.json:
        print(json.dumps(result, indent=2))
    elif result["available"]:
        print(f"native CPU kernels ready in {result['directory']} ("
              f"{'built' if result['built'] else 'loaded from the cache'} in "
              f"{result['seconds']:.1f} s; int4 / int8 kernels: {result['isa']})")
    else:
        print_error(f"native CPU kernels unavailable: {result['reason']}; generation still "
                    "works on the plain-torch path, only slower")
    return 0 if result["available"] else 1
