"""scripts/bench_whole_model.py's argument and machine checks (the benchmark itself is run by hand or by
scripts/smoke_8gpu.sh): --dry-run states the plan, what it cannot run exits 2 naming the reason."""

import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_whole_model.py"


def _run(*args):  # each run imports torch and Megatron (about 7 s of CPU)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU tier's checks; a GPU node takes --device cuda")
def test_dry_run_and_refusals_on_a_machine_without_cuda():
    r = _run("--dry-run", "--bf16", "--layouts", "tp2,ep4,etp1", "--families", "mixtral-like", "--steps", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("would time 3 steps of mixtral-like under tp2,ep4,etp1 on 8 gloo ranks in CPU mode, bf16: ours vs "
            "Megatron's alltoall MoELayer, alternated") in r.stdout
    r = _run("--device", "cuda", "--dry-run")
    assert r.returncode == 2 and "--device cuda runs 8 ranks with one GPU each, but this machine has 0 GPU(s)" in r.stderr
    r = _run("--layouts", "tp3,ep4", "--dry-run")
    assert r.returncode == 2 and "world_size 8 is not divisible by TP*CP*PP = 3*1*1 = 3" in r.stderr
