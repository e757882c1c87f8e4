"""scripts/bench_moe_layer.py: the plan and the refusals (what this machine cannot run exits 2 naming the
reason), and one tiny run end to end with the working tree's own HEAD as the baseline: identical code on
both sides must count identical collectives, bytes, kernels, copies and syncs (the before/after machinery
adds nothing of its own). Uncommitted changes to megatron_fold/moe make the two sides differ: commit first."""

import pathlib
import re
import subprocess
import sys

import pytest
import torch

from tests.script_main import run_main

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_moe_layer.py"


def _run(*args, timeout=300):  # a run of its own imports torch and Megatron (about 6 s of CPU)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def _main(capsys, *args):
    return run_main(capsys, "bench_moe_layer.py", *args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU tier's checks; a GPU node takes --device cuda")
def test_dry_run_and_refusals_on_a_machine_without_cuda(capsys):
    status, out, err = _main(capsys, "--dry-run", "--bf16", "--layouts", "tp2,ep4,etp1", "--models", "mixtral-like",
                             "--iters", "3", "--baseline-rev", "HEAD")
    assert status == 0, err
    assert re.search(r"would time 3 forward\+backward iterations of mixtral-like under tp2,ep4,etp1 on 8 gloo ranks "
                     r"in CPU mode, bf16, .*Megatron's alltoall MoELayer, ours at HEAD = [0-9a-f]+ \(before\), ours",
                     out), out
    status, _, err = _main(capsys, "--device", "cuda", "--dry-run")
    assert status == 2 and "--device cuda runs 8 ranks with one GPU each, but this machine has 0 GPU(s)" in err
    status, _, err = _main(capsys, "--layouts", "tp3,ep4", "--dry-run")
    assert status == 2 and "world_size 8 is not divisible by TP*CP*PP = 3*1*1 = 3" in err
    status, _, err = _main(capsys, "--layouts", "cp2,ep8", "--seq", "6", "--dry-run")
    assert status == 2 and "--seq 6 does not split over CP 2 and TP 1" in err
    status, _, err = _main(capsys, "--baseline-rev", "no-such-revision", "--dry-run")
    assert status == 2 and "baseline revision 'no-such-revision' is not a commit of" in err


def _table(stdout):
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 10 and parts[2] in ("upstream", "before", "ours"):
            rows[parts[2]] = dict(zip(["time", "syncs", "colls", "kb_sent", "kernels", "copies", "kb_copied"],
                                      map(float, parts[3:])))
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU tier's run")
def test_tiny_run_with_head_as_baseline_counts_alike():
    r = _run("--iters", "1", "--seq", "16", "--hidden", "16", "--layouts", "tp2,ep4,etp1", "--models", "mixtral-like",
             "--baseline-rev", "HEAD", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _table(r.stdout)
    assert set(rows) == {"upstream", "before", "ours"}, r.stdout
    before, ours = rows["before"], rows["ours"]
    for key in ("syncs", "colls", "kb_sent", "kernels", "copies", "kb_copied"):
        assert before[key] == ours[key], (key, r.stdout)
    # Closed form for this layout (EP4, ETP1, dropless): count exchange, hidden + probs out, combine back;
    # backward: both gradients back, the combine's forward again. One host sync (Megatron's budget).
    assert ours["colls"] == 7 and ours["syncs"] == 1 and rows["upstream"]["syncs"] == 1
    assert rows["upstream"]["time"] == 1.0 and ours["kernels"] > 0 and ours["copies"] > 0
    assert "forward bytes / minimum: ours" in r.stdout and "NaN check on: 8 colls (off: 7)" in r.stdout
