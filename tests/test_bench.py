"""`pio bench` pieces: the bytes a decode step reads, the machine probes and one tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from inference_pio import bench
from inference_pio.cli import main
from inference_pio.layers.quantization import QuantConfig
from inference_pio.testing import random_model, tiny_moe_config


def _expected_active_bytes(model: torch.nn.Module, config, per_expert: int) -> int:
    total = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    total -= model.model.embed_tokens.weight.nbytes  # one row per token: ignored
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    expert_total = moe_layers * config.num_experts * per_expert
    return total - expert_total + moe_layers * config.num_experts_per_tok * per_expert


@pytest.mark.parametrize("quant", [None, QuantConfig("int4", group_size=32), QuantConfig("int8")])
def test_active_bytes_count_top_k_experts_and_skip_the_embedding(quant) -> None:
    config = tiny_moe_config()
    model = random_model(config, torch.float32, quant)
    experts = model.model.layers[0].mlp.experts
    if quant is None:
        per_expert = experts.gate_up_proj[0].nbytes + experts.down_proj[0].nbytes
    else:
        per_expert = sum(experts.method.nbytes(r, c) for r, c in experts.shapes.values())
    assert bench.active_weight_bytes(model, config) == _expected_active_bytes(
        model, config, per_expert)


def test_machine_probes_are_positive() -> None:
    assert bench.measure_read_bandwidth(16 * 2**20, repeats=2) > 1e8
    assert bench.measure_fp32_flops(128, repeats=2) > 1e7


def test_cpu_stall_pct() -> None:
    assert bench.cpu_stall_pct(2.0, 4.0, 2) == 0.0
    assert math.isclose(bench.cpu_stall_pct(2.0, 1.0, 2), 75.0)


def test_pio_bench_tiny_synthetic_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--preset", "tiny", "--decode-tokens", "3", "--prompt-len", "8",
               "--streams", "1,2", "--quantization", "int4", "--group-size", "32", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decode_tok_s"] > 0 and report["prefill_tok_s"] > 0
    assert set(report["throughput"]) == set(report["decode_throughput"]) == {"1", "2"}
    assert all(v > 0 for v in report["decode_throughput"].values())
    assert 0 < report["decode_fraction_of_ceiling"]
    assert report["quantization"].startswith("int4 (group 32)")


def test_pio_bench_repeat_reports_the_median(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--preset", "tiny", "--decode-tokens", "2", "--prompt-len", "0",
               "--streams", "1", "--repeat", "3", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    runs = report["decode_runs"]
    assert len(runs) == 3 and report["decode_tok_s"] == sorted(runs)[1]
    rc = main(["bench", "--preset", "tiny", "--decode-tokens", "2", "--prompt-len", "0",
               "--streams", "1", "--repeat", "2"])
    assert rc == 0 and "median of 2:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tiny", "--repeat", "0"])
    assert "'0': give a whole number of 1 or more" in capsys.readouterr().err


def test_pio_bench_rejects_bad_streams(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tiny", "--streams", "0,x"])
    assert "stream counts" in capsys.readouterr().err


def test_pio_bench_profile_rows_add_up(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--preset", "tiny", "--decode-tokens", "3", "--prompt-len", "0",
               "--streams", "1", "--quantization", "int8", "--profile", "--json"])
    assert rc == 0
    prof = json.loads(capsys.readouterr().out)["profile"]
    assert prof[-1]["op"] == "(the rest)"
    assert all(p["ms_per_token"] >= 0 for p in prof[:-1])
    assert math.isclose(sum(p["share"] for p in prof), 1.0, rel_tol=1e-6)
    rc = main(["bench", "--preset", "tiny", "--decode-tokens", "2", "--prompt-len", "0",
               "--streams", "1", "--profile"])
    assert rc == 0 and "decode step profile" in capsys.readouterr().out


def test_pio_bench_model_dir_reports_the_checkpoint_format(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from inference_pio.testing import write_random_checkpoint

    write_random_checkpoint(tmp_path, tiny_moe_config(), quantization=QuantConfig("int4",
                                                                                  group_size=32))
    rc = main(["bench", "--model", str(tmp_path), "--decode-tokens", "2", "--prompt-len", "0",
               "--streams", "1", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantization"].startswith("int4 (group 32)"), report["quantization"]
