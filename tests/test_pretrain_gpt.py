"""`python -m megatron_fold.pretrain_gpt`: finding pretrain_gpt.py, the flags on Megatron-LM's parser, exit codes.

Each test runs against a minimal pretrain_gpt.py written here (it parses with the wheel's
parse_and_validate_args as the real one does and records what it got) and, when MEGATRON_LM_PATH names a
Megatron-LM checkout, against that checkout's unmodified pretrain_gpt.py (a single rank of a WORLD_SIZE 8 job,
which validates the arguments and stops at the rendezvous; tests/megatron_lm/ trains it on 8 ranks).
"""

import importlib.metadata
import importlib.util
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
                   "layer_spec": getattr(spec, "__module__", None) and f"{spec.__module__}.{spec.__name__}",
                   "no_persist_layer_norm": args.no_persist_layer_norm, "apply_rope_fusion": args.apply_rope_fusion,
                   "gradient_accumulation_fusion": args.gradient_accumulation_fusion,
                   "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")}, f)
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


def _env(tmp_path, env_extra=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MEGATRON_LM_PATH", "RANK", "WORLD_SIZE", "CUDA_DEVICE_MAX_CONNECTIONS")}
    env.update({"WORLD_SIZE": "8", "RANK": "0", "MFOLD_TEST_OUT": str(tmp_path / "out.json"), **(env_extra or {})})
    return env


def _run(argv, tmp_path, env_extra=None):
    return subprocess.run([sys.executable, "-m", "megatron_fold.pretrain_gpt", *argv], cwd=tmp_path,
                          env=_env(tmp_path, env_extra), capture_output=True, text=True, timeout=240)


def _run_as_on_a_gpu_machine(argv, tmp_path, monkeypatch, capsys, env_extra=None):
    """The drop-in in this process as on a CUDA machine without TE / Apex: the CPU tier (which supplies its
    own --transformer-impl local and kernel flags on a machine without CUDA) is not entered."""
    import types

    from megatron_fold import pretrain_gpt_runtime

    for key in ("MEGATRON_LM_PATH", "RANK", "WORLD_SIZE", "CUDA_DEVICE_MAX_CONNECTIONS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"WORLD_SIZE": "8", "RANK": "0", "MFOLD_TEST_OUT": str(tmp_path / "out.json"),
                       **(env_extra or {})}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(pretrain_gpt_runtime, "on_cpu", lambda: False)
    from megatron.training import global_vars

    global_vars.unset_global_variables()  # Megatron's own reset between runs in one process
    capsys.readouterr()
    try:
        rc = _main_rc(argv)
    finally:
        global_vars.unset_global_variables()
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=rc, stdout=out, stderr=err)


def _is_minimal(directory) -> bool:
    return (pathlib.Path(directory) / "sibling_builders.py").exists()


def _plugin_flags() -> list[str]:
    """Every option string the plugin registers, read off the parser add_arguments fills."""
    import argparse

    parser = megatron_lm.add_arguments(argparse.ArgumentParser(add_help=False))
    return [flag for action in parser._actions for flag in action.option_strings]


def test_help_lists_plugin_flags(megatron_dir, tmp_path):
    r = _run(["--megatron-lm", str(megatron_dir), "--help"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    usage = next(line for line in r.stdout.splitlines() if line.startswith("usage: python -m megatron_fold"))
    assert "--megatron-lm DIR" in usage  # our usage line first, with every plugin flag
    flags = _plugin_flags()
    assert len(flags) == 6 and all(f"[{flag}" in usage for flag in flags), (flags, usage)
    for flag in (*flags, "--num-experts"):  # and Megatron-LM's own help, with the plugin's group
        assert flag in r.stdout.split(usage, 1)[1], flag


def test_flag_reaches_megatron_parser_with_its_spec(megatron_dir, tmp_path):
    r = _run(["--megatron-lm=" + str(megatron_dir), *ARGS, "--moe-fold", "--moe-fold-drop-scope", "sequence",
              "--moe-fold-no-check-finite"], tmp_path)
    if _is_minimal(megatron_dir):
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads((tmp_path / "out.json").read_text())
        got = {k: got[k] for k in ("mark", "file", "moe_fold", "drop_scope", "check_finite", "spec", "layer_spec")}
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


# ---- the checkout's release against the installed megatron-core (exit 2 on a mismatch) ----

INSTALLED = importlib.metadata.version("megatron-core")


def _with_package_info(directory: pathlib.Path, major: int, minor: int, patch: int, pre: str = "") -> pathlib.Path:
    """A checkout's megatron/core/package_info.py, as Megatron-LM writes it."""
    info = _write_minimal(directory) / "megatron" / "core" / "package_info.py"
    info.parent.mkdir(parents=True)
    info.write_text(f"# Copyright\n\nMAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = '{pre}'\n\n"
                    "VERSION = (MAJOR, MINOR, PATCH, PRE_RELEASE)\n")
    return directory


@pytest.mark.parametrize("version", [(0, 18, 0, ""), (0, 20, 0, "rc0"), (1, 19, 0, "")])
def test_checkout_of_another_release_exits_2_naming_both(tmp_path, monkeypatch, capsys, version):
    directory = _with_package_info(tmp_path / "Megatron-LM", *version)
    monkeypatch.delenv("RANK", raising=False)
    assert pretrain_gpt.main(["--megatron-lm", str(directory), *ARGS, "--moe-fold"]) == 2
    err = capsys.readouterr().err
    found = "{}.{}.{}{}".format(*version)
    assert err.count("megatron-fold: error") == 1
    assert f"is version {found}, but the installed megatron-core is {INSTALLED}" in err, err
    assert "core_v0.19.0" in err


def test_checkout_of_the_same_release_runs_with_what_megatron_needs_set(tmp_path, monkeypatch, capsys):
    """A 0.19.0 checkout (its megatron/ folder first on sys.path, as a full checkout's is) runs against the
    0.19.x wheel without a note; unset CUDA_DEVICE_MAX_CONNECTIONS is set to 1, and a fused kernel whose
    package is missing is turned off, each with one note."""
    assert INSTALLED.startswith("0.19.")  # megatron_fold's own import check; a 0.19.0 checkout fits any 0.19.x
    directory = _with_package_info(tmp_path / "Megatron-LM", 0, 19, 0)
    assert pretrain_gpt.checkout_version(str(directory)) == "0.19.0"
    pretrain_gpt.check_checkout_version(str(directory / "pretrain_gpt.py"))  # no error
    assert capsys.readouterr().out == ""  # and no note
    argv = [a for a in ARGS if a not in ("--no-rope-fusion", "--no-gradient-accumulation-fusion")]
    r = _run_as_on_a_gpu_machine(["--megatron-lm", str(directory), *argv, "--position-embedding-type=rope", "--moe-fold"],
                                 tmp_path, monkeypatch, capsys)
    assert r.returncode == 0 and "version is unknown" not in r.stdout, r.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["cuda_device_max_connections"] == "1" and r.stdout.count("set CUDA_DEVICE_MAX_CONNECTIONS=1") == 1
    missing = {"--no-persist-layer-norm": ("no_persist_layer_norm", True, not _have_apex()),
               "--no-gradient-accumulation-fusion": ("gradient_accumulation_fusion", False, not _have_apex()),
               "--no-rope-fusion": ("apply_rope_fusion", False, not _have_te())}
    for flag, (key, value, package_missing) in missing.items():
        if package_missing:
            assert got[key] == value and r.stdout.count(f"megatron-fold: note: {flag} set") == 1, (flag, r.stdout)
        else:
            assert f"megatron-fold: note: {flag} set" not in r.stdout


def test_checkout_without_package_info_runs_with_a_note(tmp_path, monkeypatch, capsys):
    directory = _write_minimal(tmp_path / "scripts-only")
    assert pretrain_gpt.checkout_version(str(directory)) is None
    r = _run_as_on_a_gpu_machine(["--megatron-lm", str(directory), *ARGS, "--moe-fold"], tmp_path, monkeypatch, capsys,
                                 {"CUDA_DEVICE_MAX_CONNECTIONS": "8"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Megatron-LM version is unknown") == 1
    assert f"core_v0.19.x, the release of the installed megatron-core {INSTALLED}" in r.stdout
    # The user's CUDA_DEVICE_MAX_CONNECTIONS stays, without a note.
    assert json.loads((tmp_path / "out.json").read_text())["cuda_device_max_connections"] == "8"
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in r.stdout


# ---- errors once, not once per rank ----

def _main_rc(argv) -> int:
    try:
        return pretrain_gpt.main(argv)
    except SystemExit as e:  # argparse's error exits, as it does under `python -m`
        return e.code


@pytest.mark.parametrize("extra, message", [  # Megatron's argparse, the plugin's check, Megatron's validate_args
    (["--moe-fold-drop-scope", "bogus"], "pretrain_gpt.py: error: argument --moe-fold-drop-scope: invalid choice: 'bogus'"),
    (["--expert-model-parallel-size=3"], "megatron-fold: error: --moe-fold cannot run"),
    (["--global-batch-size=12"], "megatron-fold: error: Megatron-LM refused the arguments (arguments.py:"),
])
def test_errors_are_printed_by_rank_0_only(tmp_path, monkeypatch, capsys, extra, message):
    directory = _write_minimal(tmp_path / "Megatron-LM")
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    argv = ["--megatron-lm", str(directory), *ARGS, "--moe-fold", *extra]
    assert _main_rc(argv) == 2
    err0 = capsys.readouterr().err
    assert err0.count(message) == 1, err0[-3000:]
    assert "usage:" not in err0 and "Traceback" not in err0, err0[-3000:]  # not Megatron's ~700 lines of usage
    monkeypatch.setenv("RANK", "3")
    assert _main_rc(argv) == 2
    assert "error" not in capsys.readouterr().err


# ---- the environment Megatron-LM needs ----

def test_cuda_device_max_connections_left_unset_for_fsdp(monkeypatch):
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    pretrain_gpt.set_cuda_device_max_connections(["--use-megatron-fsdp"])  # Megatron refuses 1 with FSDP
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ


def _have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _have_apex() -> bool:
    return importlib.util.find_spec("apex") is not None and importlib.util.find_spec("apex.normalization") is not None


@pytest.mark.skipif(_have_te(), reason="Transformer Engine is installed: its layers are Megatron-LM's default")
def test_without_transformer_engine_its_layers_are_refused_naming_the_flag(tmp_path, monkeypatch, capsys):
    directory = _write_minimal(tmp_path / "Megatron-LM")
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    argv = [a for a in ARGS if a != "--transformer-impl=local"]
    err = _run_as_on_a_gpu_machine(["--megatron-lm", str(directory), *argv, "--moe-fold"], tmp_path, monkeypatch,
                                   capsys).stderr
    assert err.count("megatron-fold: error: Transformer Engine is not installed") == 1 and "Traceback" not in err
    assert "pass --transformer-impl local" in err
