"""scripts/gpu_flag_parity.py's checks that run without a GPU: --dry-run builds and checks every configuration
the GPU run uses (so a refused flag combination shows up here, not after minutes on a lent GPU), and the run
itself exits 2 naming what the machine lacks."""

import importlib.util
import pathlib

import pytest
import torch

from tests.script_main import run_main

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "gpu_flag_parity.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_flag_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_dry_run_plans_and_the_run_is_refused_without_a_gpu(capsys):
    status, out, err = run_main(capsys, "gpu_flag_parity.py", "--dry-run")
    assert status == 0, err
    lines = out.splitlines()
    assert sum(line.startswith("parity ") for line in lines) == 11  # 2 scopes x 5 flag sets + the chunk sort
    assert "time qwen2-57b-a14b +shared-overlap: ours, ours with check_finite, Megatron alltoall" in out
    assert "machine: gpu_flag_parity.py needs a CUDA GPU" in out
    status, _, err = run_main(capsys, "gpu_flag_parity.py")
    assert status == 2 and "gpu_flag_parity.py: error: gpu_flag_parity.py needs a CUDA GPU" in err


def test_dry_run_refuses_a_configuration_the_fused_kernels_refuse():
    module = _module()
    module.PARITY_FLAGS = (*module.PARITY_FLAGS, ("fp64 router", dict(moe_router_fusion=True, moe_router_dtype="fp64")))
    with pytest.raises(ValueError, match="moe_router_fusion=True with moe_router_dtype='fp64'"):
        module.dry_run()
