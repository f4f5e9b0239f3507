"""Which instruction set the native int4 / int8 kernels are built for (kernels/cpu.py,
csrc/int4_vnni.h, csrc/int8_vnni.h):

1. "auto" picks AVX-512 VNNI exactly where /proc/cpuinfo reports AVX-512 F/BW/VL and VNNI, and
   the loaded library says which kernel it holds;
2. INFERENCE_PIO_CPU_ISA: a bad value, or avx512vnni on a CPU without it, is a one-line reason
   (the plain-torch path runs), never a build that would crash on the first instruction;
3. on a VNNI machine the AVX2 build is tested too, in a subprocess with its own build: the int4
   and int8 and MoE kernel tests of test_kernels.py pass on it (on an AVX2 machine the main run covers
   it, and the VNNI kernel cannot run: that test skips, saying so)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference_pio import envs
from inference_pio.kernels import cpu

HAS_VNNI = cpu.VNNI_CPU_FLAGS <= cpu.cpu_flags()


def test_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERENCE_PIO_CPU_ISA", raising=False)
    assert cpu.target_isa() == ("avx512vnni" if HAS_VNNI else "avx2")
    assert ("-mavx512vnni" in cpu.cflags()) == HAS_VNNI
    assert cpu.target_isa(frozenset({"avx2", "fma"})) == "avx2"
    assert cpu.target_isa(frozenset({"avx2", "avx512f", "avx512_vnni"})) == "avx2"  # no BW, VL
    assert cpu.target_isa(cpu.VNNI_CPU_FLAGS | {"avx2"}) == "avx512vnni"


def test_each_target_has_its_own_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_PIO_CPU_ISA", "avx2")
    avx2 = cpu.build_name()
    monkeypatch.setenv("INFERENCE_PIO_CPU_ISA", "avx512vnni")
    assert cpu.build_name() != avx2


def test_loaded_kernel_says_which(monkeypatch: pytest.MonkeyPatch) -> None:
    if not cpu.available():
        pytest.skip(f"native CPU kernels unavailable: {cpu.reason()}")
    assert cpu.isa() == cpu.target_isa()
    assert cpu.warmup()["isa"] == cpu.isa()


def test_bad_values_are_one_line_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_PIO_CPU_ISA", "avx9000")
    with pytest.raises(ValueError, match="INFERENCE_PIO_CPU_ISA='avx9000' is not one of auto"):
        envs.cpu_isa()
    monkeypatch.setattr(cpu, "_state", {})
    assert not cpu.available()
    assert "avx9000" in (cpu.reason() or "")
    monkeypatch.setenv("INFERENCE_PIO_CPU_ISA", "avx512vnni")
    reason = cpu.isa_problem(frozenset({"avx2", "fma", "avx512f"})) or ""
    assert "lacks avx512_vnni, avx512bw, avx512vl" in reason and "avx2" in reason
    assert cpu.isa_problem(cpu.VNNI_CPU_FLAGS) is None
    monkeypatch.setenv("INFERENCE_PIO_CPU_ISA", "avx2")
    assert cpu.isa_problem(frozenset({"avx2"})) is None
    if not HAS_VNNI:  # this CPU itself: the loader gives the reason and builds nothing
        monkeypatch.setenv("INFERENCE_PIO_CPU_ISA", "avx512vnni")
        monkeypatch.setattr(cpu, "_state", {})
        assert not cpu.available()
        assert "INFERENCE_PIO_CPU_ISA=avx512vnni, but the CPU lacks" in (cpu.reason() or "")


@pytest.mark.skipif(not HAS_VNNI, reason="this CPU has no AVX-512 VNNI: the main run already "
                    "tests the AVX2 kernel, and the VNNI one cannot run here")
def test_the_avx2_build_passes_the_kernel_tests_too() -> None:
    env = dict(os.environ, INFERENCE_PIO_CPU_ISA="avx2")
    tests = Path(__file__).parent / "test_kernels.py"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), "-k",
         "int4 or int8 or moe or batch", "-x"],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]
    code = "from inference_pio.kernels import cpu; print(cpu.isa())"
    which = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert which.stdout.strip() == "avx2", which.stderr[-2000:]
