"""`python -m megatron_fold.pretrain_gpt`: finding pretrain_gpt.py, the flags on Megatron-LM's parser, exit codes.

Each test runs against a minimal pretrain_gpt.py written here (it parses with the wheel's
parse_and_validate_args as the real one does and records what it got) and, when MEGATRON_LM_PATH names a
Megatron-LM checkout, against that checkout's unmodified pretrain_gpt.py (a single rank of a WORLD_SIZE 8 job,
which validates the arguments and stops at the rendezvous; tests/megatron_lm/ trains it on 8 ranks).
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from megatron_fold import megatron_lm, pretrain_gpt

ROOT = pathlib.Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "pretrain_gpt-core_v0.19.0.patch"
CHECKOUT = os.environ.get("MEGATRON_LM_PATH")
NO_CHECKOUT = "MEGATRON_LM_PATH does not name a Megatron-LM checkout (tag core_v0.19.0)"

# A valid small MoE run on 8 ranks (TP = CP = 1: validate_args asks the GPU nothing then).
ARGS = ["--num-layers=4", "--hidden-size=16", "--num-attention-heads=4", "--ffn-hidden-size=32", "--num-experts=8",
        "--moe-router-topk=2", "--moe-ffn-hidden-size=8", "--seq-length=16", "--max-position-embeddings=16",
        "--micro-batch-size=1", "--global-batch-size=8", "--tokenizer-type=NullTokenizer", "--vocab-size=64",
        "--lr=1e-4", "--train-iters=2", "--mock-data", "--transformer-impl=local", "--no-rope-fusion",
        "--no-gradient-accumulation-fusion", "--expert-model-parallel-size=8"]

MINIMAL = '''"""Stand-in for Megatron-LM's pretrain_gpt.py: a sibling import, then its argument handling."""
import json
import os

from sibling_builders import MARK  # like gpt_builders / model_provider: needs this directory on sys.path
from megatron.training.argument_utils import gpt_config_from_args
from megatron.training.arguments import parse_and_validate_args

if __name__ == "__main__":
    args = parse_and_validate_args(extra_args_provider=None, args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    spec = gpt_config_from_args(args).transformer_layer_spec
    with open(os.environ["MFOLD_TEST_OUT"], "w") as f:
        json.dump({"mark": MARK, "file": __file__, "moe_fold": args.moe_fold, "drop_scope": args.moe_fold_drop_scope,
                   "check_finite": args.moe_fold_check_finite, "spec": args.spec,
                   "layer_spec": getattr(spec, "__module__", None) and f"{spec.__module__}.{spec.__name__}"}, f)
'''


def _write_minimal(directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pretrain_gpt.py").write_text(MINIMAL)
    (directory / "sibling_builders.py").write_text("MARK = 'sibling imported'\n")
    return directory


@pytest.fixture(params=["minimal", "checkout"])
def megatron_dir(request, tmp_path):
    if request.param == "checkout":
        if not CHECKOUT or not os.path.isfile(os.path.join(CHECKOUT, "pretrain_gpt.py")):
            pytest.skip(NO_CHECKOUT)
        return pathlib.Path(CHECKOUT)
    return _write_minimal(tmp_path / "Megatron-LM")


def _run(argv, tmp_path, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("MEGATRON_LM_PATH", "RANK", "WORLD_SIZE")}
    env.update(WORLD_SIZE="8", RANK="0", MFOLD_TEST_OUT=str(tmp_path / "out.json"), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "megatron_fold.pretrain_gpt", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)


def _is_minimal(directory) -> bool:
    return (pathlib.Path(directory) / "sibling_builders.py").exists()


def test_help_lists_plugin_flags(megatron_dir, tmp_path):
    r = _run(["--megatron-lm", str(megatron_dir), "--help"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--megatron-lm DIR" in r.stdout  # our usage line first
    for flag in ("--moe-fold ", "--moe-fold-drop-scope", "--moe-fold-no-check-finite", "--num-experts"):
        assert flag in r.stdout, flag


def test_flag_reaches_megatron_parser_with_its_spec(megatron_dir, tmp_path):
    r = _run(["--megatron-lm=" + str(megatron_dir), *ARGS, "--moe-fold", "--moe-fold-drop-scope", "sequence",
              "--moe-fold-no-check-finite"], tmp_path)
    if _is_minimal(megatron_dir):
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads((tmp_path / "out.json").read_text())
        assert got == {"mark": "sibling imported", "file": str(megatron_dir / "pretrain_gpt.py"), "moe_fold": True,
                       "drop_scope": "sequence", "check_finite": False, "spec": megatron_lm.SPEC,
                       "layer_spec": "megatron_fold.megatron_lm.fold_layer_spec"}
    else:
        import torch

        if torch.cuda.is_available():
            pytest.skip("with CUDA this would start training; the smoke test (scripts/smoke_8gpu.sh) runs it")
        # Arguments validated (Megatron prints them, ours included), the CPU tier took over, and the one rank
        # of a WORLD_SIZE 8 job stopped at torch.distributed's rendezvous (tests/megatron_lm train for real).
        assert re.search(r"moe_fold_drop_scope \.+ sequence", r.stdout) and re.search(r"spec \.+ \['megatron_fold", r.stdout)
        assert "megatron-fold: no CUDA device: Megatron-LM trains on CPU ranks (gloo)" in r.stdout
        errors = [line for line in r.stderr.splitlines() if line.startswith("megatron-fold: error")]
        assert r.returncode == 1 and len(errors) == 1 and "MASTER_ADDR" in errors[0], r.stderr[-3000:]
        assert "Traceback" not in r.stderr


def test_bad_layout_exits_2_naming_flags(megatron_dir, tmp_path):
    r = _run(["--megatron-lm", str(megatron_dir), *ARGS, "--expert-model-parallel-size=3", "--moe-fold"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "megatron-fold: error" in r.stderr
    assert "--expert-model-parallel-size 3" in r.stderr and "EP values that fit: 1, 2, 4, 8" in r.stderr
    assert "Traceback" not in r.stderr


def test_checkout_from_environment_variable(tmp_path):
    directory = _write_minimal(tmp_path / "from-env")
    r = _run([*ARGS, "--moe-fold"], tmp_path, {"MEGATRON_LM_PATH": str(directory)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())["file"] == str(directory / "pretrain_gpt.py")


def test_find_pretrain_gpt_order(tmp_path, monkeypatch):
    a, b, c = (_write_minimal(tmp_path / n) for n in "abc")
    monkeypatch.setenv("MEGATRON_LM_PATH", str(b))
    monkeypatch.setattr(sys, "path", [str(tmp_path), str(c)])
    assert pretrain_gpt.find_pretrain_gpt(str(a)) == str(a / "pretrain_gpt.py")  # --megatron-lm first
    assert pretrain_gpt.find_pretrain_gpt() == str(b / "pretrain_gpt.py")  # then the environment
    monkeypatch.delenv("MEGATRON_LM_PATH")
    assert pretrain_gpt.find_pretrain_gpt() == str(c / "pretrain_gpt.py")  # then sys.path


@pytest.mark.parametrize("argv, env, message", [
    (["--moe-fold"], None, "pass --megatron-lm DIR or set MEGATRON_LM_PATH"),
    (["--megatron-lm", "{empty}", "--moe-fold"], None, "--megatron-lm {empty}: no pretrain_gpt.py there"),
    (["--moe-fold"], "{empty}", "MEGATRON_LM_PATH {empty}: no pretrain_gpt.py there"),
    (["--moe-fold", "--megatron-lm"], None, "--megatron-lm needs a directory"),
])
def test_no_checkout_exits_2(tmp_path, monkeypatch, capsys, argv, env, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(sys, "path", [str(empty)])
    monkeypatch.delenv("MEGATRON_LM_PATH", raising=False)
    if env:
        monkeypatch.setenv("MEGATRON_LM_PATH", env.format(empty=empty))
    assert pretrain_gpt.main([a.format(empty=empty) for a in argv]) == 2
    assert message.format(empty=empty) in capsys.readouterr().err


def test_with_fold_spec():
    assert megatron_lm.with_fold_spec(["--moe-fold"]) == ["--moe-fold", "--spec", *megatron_lm.SPEC]
    assert megatron_lm.with_fold_spec(["--num-layers=2"]) == ["--num-layers=2"]
    mine = ["--moe-fold", "--spec", "my.module", "my_spec"]
    assert megatron_lm.with_fold_spec(mine) == mine  # validation then names the mismatch


def test_patch_calls_functions_that_exist():
    text = PATCH.read_text()
    changed = [line.split(" b/")[-1] for line in text.splitlines() if line.startswith("diff --git")]
    assert changed == ["pretrain_gpt.py"]
    for name in ("install_arguments", "add_fold_spec_to_sys_argv"):
        assert f"moe_fold.{name}()" in text and callable(getattr(megatron_lm, name))


@pytest.mark.skipif(not CHECKOUT or not shutil.which("git"), reason=NO_CHECKOUT + " (or git is missing)")
def test_patch_applies_to_checkout(tmp_path):
    # Against a copy of the file, so the checkout is never modified.
    shutil.copy(os.path.join(CHECKOUT, "pretrain_gpt.py"), tmp_path / "pretrain_gpt.py")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    r = subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # The patched file, run beside the checkout's modules: the flags are on its parser and checked.
    subprocess.run(["git", "apply", str(PATCH)], cwd=tmp_path, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(WORLD_SIZE="8", RANK="0", PYTHONPATH=CHECKOUT)
    r = subprocess.run([sys.executable, str(tmp_path / "pretrain_gpt.py"), *ARGS, "--expert-model-parallel-size=3",
                        "--moe-fold"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and "FoldArgumentError" in r.stderr and "--expert-model-parallel-size 3" in r.stderr, \
        r.stderr[-3000:]
