"""scripts/bench_whole_model.py's argument and machine checks (the benchmark itself is run by hand or by
scripts/smoke_8gpu.sh): --dry-run states the plan, what it cannot run exits 2 naming the reason."""

import pytest
import torch

from tests.script_main import run_main


def _main(capsys, *args):
    return run_main(capsys, "bench_whole_model.py", *args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU tier's checks; a GPU node takes --device cuda")
def test_dry_run_and_refusals_on_a_machine_without_cuda(capsys):
    status, out, err = _main(capsys, "--dry-run", "--bf16", "--layouts", "tp2,ep4,etp1", "--families", "mixtral-like",
                             "--steps", "3")
    assert status == 0, err
    assert ("would time 3 steps of mixtral-like under tp2,ep4,etp1 on 8 gloo ranks in CPU mode, bf16: ours vs "
            "Megatron's alltoall MoELayer, alternated") in out
    status, _, err = _main(capsys, "--device", "cuda", "--dry-run")
    assert status == 2 and "--device cuda runs 8 ranks with one GPU each, but this machine has 0 GPU(s)" in err
    status, _, err = _main(capsys, "--layouts", "tp3,ep4", "--dry-run")
    assert status == 2 and "world_size 8 is not divisible by TP*CP*PP = 3*1*1 = 3" in err
