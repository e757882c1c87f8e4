"""The CPU tier's pieces, without a torchrun: the Megatron sites it answers, restoring them, the CPU
arguments, the dataset-helper build step, one-line errors and the data-path check."""

import importlib
import os
import re

import pytest
import torch

from megatron_fold import cpu, cpu_megatron_lm, dataset_helpers, pretrain_gpt_runtime
from megatron_fold.cpu_megatron_lm import SITES, with_cpu_arguments

MEGATRON = importlib.import_module("megatron").__path__[0]


def _lines(where: str) -> list[tuple[str, int]]:
    """'training/a.py:1131,2613-2614 (via core/b.py:5)' -> [(training/a.py, 1131), (.., 2613), (.., 2614), (core/b.py, 5)]."""
    found = []
    for path, lines in re.findall(r"([\w/]+\.py):([\d,\-]+)", where):
        for piece in lines.strip(",").split(","):
            first, _, last = piece.partition("-")
            found += [(path, n) for n in range(int(first), int(last or first) + 1)]
    return found


def _source_line(path: str, n: int) -> str:
    with open(os.path.join(MEGATRON, path)) as f:
        return f.readlines()[n - 1]


def test_every_site_names_a_line_that_makes_the_call():
    # The list is the documentation of what the CPU tier answers: each Megatron file:line it names must
    # hold the CUDA call (or the function) it says, in the installed wheel.
    for site in SITES:
        for path, n in _lines(site.where):
            text = _source_line(path, n)
            assert re.search(r"cuda|def |initialize_megatron|set_jit_fusion|report_memory|get_device_arch|"
                             r"device_count|empty_cache", text), f"{site.where}: line {n} of {path} is {text!r}"


def test_sites_cover_the_modules_the_issue_names():
    named = " ".join(site.where for site in SITES)
    for where in ("initialize.py:66", "initialize.py:270", "common_utils.py:504", "rerun_state_machine.py:264",
                  "checkpointing.py:375", "training.py:1131"):
        file, line = where.split(":")
        assert re.search(rf"{re.escape(file)}:[\d,\-]*\b{line}\b", named), where


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU tier refuses to start where CUDA is available")
def test_everything_is_restored_on_exit():
    owners = [(importlib.import_module(s.module), s.attribute) for s in SITES]
    before = [getattr(o, a) for o, a in owners]
    was_active = cpu.is_active()
    environment = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    with cpu_megatron_lm.megatron_lm_on_cpu():
        assert all(getattr(o, a) is not b for (o, a), b in zip(owners, before))
        from megatron.training import initialize

        assert initialize.torch.cuda.device_count() == 1 and torch.cuda.device_count() == 0
        assert torch.equal(initialize.torch.cuda.get_rng_state(), torch.get_rng_state())
        assert initialize.torch.zeros(2, device="cuda").device.type == "cpu"
    assert [getattr(o, a) for o, a in owners] == before
    assert cpu.is_active() == was_active and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == environment


def test_cpu_arguments_added_unless_given():
    argv, added = with_cpu_arguments(["--num-layers=2", "--no-rope-fusion", "--transformer-impl", "local"])
    assert "--distributed-backend" in added and added[added.index("--distributed-backend") + 1] == "gloo"
    assert "--no-rope-fusion" not in added and "--transformer-impl" not in added
    assert argv[:4] == ["--num-layers=2", "--no-rope-fusion", "--transformer-impl", "local"] and argv[4:] == added


@pytest.mark.parametrize("given, named", [
    (["--distributed-backend=nccl"], "--distributed-backend nccl"),
    (["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine"),
    (["--moe-grouped-gemm"], "--moe-grouped-gemm"),
])
def test_gpu_only_arguments_refused(given, named):
    with pytest.raises(cpu_megatron_lm.CpuArgumentError, match=re.escape(named)):
        with_cpu_arguments(["--num-layers=2", *given])


def test_build_step_skipped_when_the_compiled_helpers_import(monkeypatch, tmp_path):
    calls = []
    dataset_helpers.compile_helpers(lambda: calls.append("make"))  # the wheel ships helpers_cpp
    assert calls == []
    # Without them: Megatron's own build where a Makefile is, else a message naming what to install.
    monkeypatch.setattr(dataset_helpers, "_helpers_import", lambda: False)
    import megatron.core.datasets as datasets

    monkeypatch.setattr(datasets, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(dataset_helpers.DatasetHelpersMissing, match="pip install 'megatron-core==0.19.\\*'"):
        dataset_helpers.compile_helpers(lambda: calls.append("make"))
    (tmp_path / "Makefile").write_text("all:\n")
    dataset_helpers.compile_helpers(lambda: calls.append("make"))
    assert calls == ["make"]


def test_build_step_answer_is_what_initialize_calls():
    from megatron.core.datasets import utils

    original = utils.compile_helpers
    with dataset_helpers.prebuilt_dataset_helpers():
        assert utils.compile_helpers is not original
        utils.compile_helpers()  # would run `make` in the wheel (no Makefile: exit 1) without the answer
    assert utils.compile_helpers is original


def test_error_is_one_line_naming_where_megatron_stopped():
    try:
        from megatron.training.utils import get_device_arch_version

        if torch.cuda.is_available():
            pytest.skip("CUDA present: Megatron's call succeeds")
        get_device_arch_version()
    except Exception as e:  # noqa: BLE001
        line = pretrain_gpt_runtime.describe(e)
    assert "\n" not in line and "CUDA-only path" in line
    assert "megatron/training/utils/common_utils.py:504" in line


def test_data_path_without_its_files(tmp_path):
    (tmp_path / "text.bin").write_bytes(b"")
    with pytest.raises(pretrain_gpt_runtime.RunError, match=r"--data-path .*text: no .*text\.idx"):
        pretrain_gpt_runtime.check_data_paths(["--data-path", "0.5", str(tmp_path / "text"), "--lr=1"])
    (tmp_path / "text.idx").write_bytes(b"")
    pretrain_gpt_runtime.check_data_paths(["--data-path", "0.5", str(tmp_path / "text"), "--lr=1"])
    pretrain_gpt_runtime.check_data_paths(["--mock-data", "--data-path", "nowhere"])
