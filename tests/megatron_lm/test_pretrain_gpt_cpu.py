"""Megatron-LM's own pretrain_gpt.py (unmodified, core_v0.19.0) trains with --moe-fold on 8 gloo CPU ranks
under torchrun, through `python -m megatron_fold.pretrain_gpt`.

The comparison (megatron_fold.testing.pretrain_gpt_runs, shared with scripts/smoke_8gpu.sh part (b)): the
reference layout trains from scratch and saves a torch_dist checkpoint; two other folded layouts load it
and train on; the per-iteration losses Megatron-LM logs must equal the uninterrupted reference's within
LOSS_RTOL (layout invariance and resume under another layout at once), and subsequence-scope drops must
not (the control). On --mock-data and on a .bin/.idx made by Megatron-LM's tools/preprocess_data.py from
the Python standard library's source. Bad input through the same script ends with one line and a
non-zero exit on every rank.
"""

import glob
import json
import os
import re
import subprocess
import sys
import sysconfig

import pytest
import torch

from megatron_fold.testing import pretrain_gpt_runs as runs

CHECKOUT = os.environ.get("MEGATRON_LM_PATH")
pytestmark = [
    pytest.mark.skipif(not CHECKOUT or not os.path.isfile(os.path.join(CHECKOUT, "pretrain_gpt.py")),
                       reason="MEGATRON_LM_PATH does not name a Megatron-LM checkout (tag core_v0.19.0)"),
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="CUDA present: scripts/smoke_8gpu.sh part (b) runs this comparison on GPUs"),
]
MOCK = ["--mock-data", "--tokenizer-type=NullTokenizer", "--vocab-size=128"]
# The byte-level text below: ids 0-255 are bytes, NullTokenizer's end of document is vocab_size - 1.
BYTES = ["--tokenizer-type=NullTokenizer", "--vocab-size=384"]


def _print(comparison):
    print("\n" + comparison.table())


@pytest.fixture(scope="module")
def mock_comparison(tmp_path_factory):
    comparison = runs.compare_layouts(str(tmp_path_factory.mktemp("mock")), [*runs.MODEL_ARGS, *MOCK],
                                      megatron_lm=CHECKOUT)
    _print(comparison)
    return comparison


# The first test to use mock_comparison pays for its four runs of 8 ranks (about 5 minutes on 2 idle cores).
@pytest.mark.timeout(2400)
def test_layouts_agree_on_mock_data(mock_comparison):
    for name, run in mock_comparison.runs.items():
        assert run.returncode == 0, run.tail()
    assert mock_comparison.iterations == list(range(11, 21))
    assert all(set(losses) >= set(mock_comparison.iterations) for losses in mock_comparison.losses.values())
    for layout, difference in mock_comparison.differences.items():
        assert difference <= runs.LOSS_RTOL, (layout, mock_comparison.table())


@pytest.mark.timeout(2400)
def test_subsequence_control_differs(mock_comparison):
    # The same checkpoint and layout with Megatron's own drop semantics: the comparison can fail.
    assert mock_comparison.control_difference > 10 * runs.LOSS_RTOL, mock_comparison.table()


@pytest.mark.timeout(2400)
def test_resume_under_another_layout_continues_the_uninterrupted_run(mock_comparison):
    reference = mock_comparison.runs[mock_comparison.reference]
    assert "successfully saved checkpoint from iteration      10" in reference.rank_output
    resumed = mock_comparison.runs["cp2-pp2-ep4-etp1"]
    assert "successfully loaded checkpoint from" in resumed.rank_output and "at iteration 10" in resumed.rank_output
    assert min(runs.losses(resumed)) == 11  # it trained on from the checkpoint, not from scratch
    assert mock_comparison.differences["cp2-pp2-ep4-etp1"] <= runs.LOSS_RTOL


@pytest.mark.timeout(2400)
def test_cpu_run_says_what_it_added(mock_comparison):
    reference = mock_comparison.runs[mock_comparison.reference]
    assert "megatron-fold: no CUDA device: Megatron-LM trains on CPU ranks (gloo); added --distributed-backend gloo" \
        in reference.rank_output
    # Megatron's dataset-helper build step (initialize.py:178) finished without running make: the wheel has
    # no Makefile there, and make's failure would have made rank 0 exit 1 before the first iteration.
    assert "> compiling dataset index builder" in reference.rank_output
    assert ">>> done with dataset index builder" in reference.rank_output
    assert "makefile" not in reference.rank_output.lower()


def _stdlib_jsonl(path, limit_bytes=300_000):
    """Documents of the Python standard library's source, as the byte ids NullTokenizer reads."""
    with open(path, "w") as out:
        total = 0
        for source in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
            data = open(source, "rb").read()
            out.write(json.dumps({"text": " ".join(str(b) for b in data)}) + "\n")
            total += len(data)
            if total > limit_bytes:
                break


@pytest.fixture(scope="module")
def text_prefix(tmp_path_factory):
    directory = tmp_path_factory.mktemp("text")
    _stdlib_jsonl(directory / "stdlib.jsonl")
    r = subprocess.run([sys.executable, os.path.join(CHECKOUT, "tools", "preprocess_data.py"),
                        "--input", str(directory / "stdlib.jsonl"), "--output-prefix", str(directory / "stdlib"),
                        "--tokenizer-type", "NullTokenizer", "--vocab-size", "384", "--append-eod", "--workers", "1"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": CHECKOUT})
    assert r.returncode == 0, r.stderr[-3000:]
    prefix = str(directory / "stdlib_text_document")
    assert os.path.getsize(prefix + ".bin") > 100_000 and os.path.isfile(prefix + ".idx")
    return prefix


@pytest.mark.timeout(2400)
def test_layouts_agree_on_preprocessed_text(text_prefix, tmp_path):
    # Real data through Megatron's indexed dataset: the reference and the layout that differs from it most
    # (CP, PP); the mock comparison above covers the third layout (one torchrun of 8 ranks less in CI).
    layouts = {name: runs.LAYOUTS[name] for name in ("tp2-sp-ep4-etp1", "cp2-pp2-ep4-etp1")}
    comparison = runs.compare_layouts(str(tmp_path), [*runs.MODEL_ARGS, *BYTES, f"--data-path={text_prefix}",
                                                      "--split=100,0,0"], layouts=layouts, control=False,
                                      megatron_lm=CHECKOUT)
    _print(comparison)
    assert not comparison.failures, comparison.failures
    assert all(run.returncode == 0 for run in comparison.runs.values())


# ---- bad input: one line, a non-zero exit, every rank stopped ------------------------------------------

SMALL = runs.MODEL_ARGS + MOCK + ["--train-iters=4", "--moe-fold", "--moe-fold-drop-scope=sequence"]


def _bad_run(tmp_path, name, args, nproc=2):
    run = runs.torchrun(name, args, str(tmp_path), nproc=nproc, megatron_lm=CHECKOUT, timeout=300)
    assert not run.timed_out, run.tail()
    assert run.returncode != 0, run.tail()
    errors = [line for line in run.rank_output.splitlines() if line.startswith("megatron-fold: error")]
    # One message: rank 0 prints it and the others, which wait before printing, are stopped by torchrun
    # first (on a loaded machine a slow rank 0 may let a second rank repeat it, tagged with its rank).
    assert errors and len({re.sub(r"^megatron-fold: error \(rank \d+\)", "megatron-fold: error", e) for e in errors}) == 1, \
        run.tail()
    assert "Traceback" not in run.rank_output, run.tail()
    return "\n".join(run.rank_output.splitlines()[run.rank_output.splitlines().index(errors[0]):][:12])


def test_layout_that_does_not_divide(tmp_path):
    # Two ranks are enough to show it (and start four times faster than eight).
    line = _bad_run(tmp_path, "bad-layout", [*SMALL, "--expert-model-parallel-size=3"])
    assert "--expert-model-parallel-size 3" in line and "EP values that fit: 1, 2" in line, line


def test_moe_fold_without_num_experts(tmp_path):
    args = [a for a in SMALL if not a.startswith(("--num-experts", "--moe-"))] + ["--moe-fold"]
    line = _bad_run(tmp_path, "no-experts", args)
    assert "--num-experts" in line, line


def test_missing_data_path(tmp_path):
    args = [a for a in SMALL if a != "--mock-data"] + [f"--data-path={tmp_path}/nothing_text_document"]
    line = _bad_run(tmp_path, "no-data", [*args, "--expert-model-parallel-size=2"])
    assert f"--data-path {tmp_path}/nothing_text_document: no" in line and ".bin" in line, line


@pytest.mark.timeout(2400)
def test_checkpoint_of_another_model(mock_comparison, tmp_path):
    checkpoint = mock_comparison.checkpoint
    args = [a.replace("--hidden-size=64", "--hidden-size=96") for a in SMALL]
    line = _bad_run(tmp_path, "other-model", [*args, "--expert-model-parallel-size=2", "--ckpt-format=torch_dist",
                                              f"--load={checkpoint}", "--train-iters=20"])
    assert "the checkpoint given with --load does not load into this model" in line and "(96,)" in line, line


def test_uncovered_cuda_path_is_one_line(tmp_path):
    # --profile reaches torch.cuda.cudart() (training.py), which the CPU tier does not answer.
    line = _bad_run(tmp_path, "profile", [*SMALL, "--expert-model-parallel-size=2", "--profile",
                                          "--profile-step-start=1", "--profile-step-end=2"])
    assert "CUDA-only path" in line and "megatron/training/training.py:" in line, line
