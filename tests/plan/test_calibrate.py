"""`megatron-fold calibrate` on CPU: a tiny grid, gloo for the collectives. Checks the schema, that every
measured number is positive and marked measured, and that the profile plans."""

import json

import pytest

from megatron_fold.cli import main
from megatron_fold.plan.profile import SCHEMA, load_profile

torch = pytest.importorskip("torch")


def test_calibrate_writes_a_profile_that_plans(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["calibrate", "--out", str(out), "--device", "cpu", "--grid", "tiny", "--base", "a100"]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA
    prof = load_profile(str(out))  # the schema checks pass
    raw = prof.measured
    assert len(raw["gemm"]) == 3 and len(raw["grouped"]) == 2 and [a["chunk"] for a in raw["attention"]] == [64, 128]
    assert all(g["seconds"] > 0 for g in raw["gemm"] + raw["grouped"]) and raw["copy_gbs"] > 0
    best = max(2 * g["m"] * g["n"] * g["k"] / g["seconds"] for g in raw["gemm"]) / 1e12
    assert prof.peak_tflops == pytest.approx(best) and prof.gemm_max_efficiency == pytest.approx(1.0)
    assert prof.hbm_gbs == raw["copy_gbs"] and prof.grouped_gemm_factor > 0
    assert prof.host_sync_us == raw["host_sync_us"] > 0
    for field in ("gemm_max_efficiency", "grouped_gemm_factor", "hbm_gbs", "attention", "peak_tflops", "host_sync_us"):
        assert "measured by megatron-fold calibrate on CPU" in prof.sources[field]
    # one process measures no link: those come from the base preset, and say so
    assert raw["collectives"] is None and prof.sources["network_gbs"].startswith("from the base preset a100")
    capsys.readouterr()
    assert main(["plan", "--model", "mixtral-8x7b", "--gpus", "16", "--profile", str(out), "--top", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu"] == prof.name


def _collectives(rank, world):
    from megatron_fold.plan.calibrate import measure_collectives

    return measure_collectives("cpu", 2**16, 2)


def test_collectives_on_gloo_ranks():
    from megatron_fold.testing.multirank import run_on_ranks

    results = run_on_ranks(_collectives, 2, timeout=120)
    assert results[0] == results[1]  # every rank writes the same (slowest) numbers
    r = results[0]
    assert r["ranks"] == 2 and r["latency_us"] > 0
    assert r["all_gather_gbs"] > 0 and r["reduce_scatter_gbs"] > 0


def test_calibrate_refuses_cuda_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["calibrate", "--out", str(tmp_path / "x.json"), "--device", "cuda", "--grid", "tiny"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
