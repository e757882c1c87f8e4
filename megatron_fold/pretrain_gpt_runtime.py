"""How `python -m megatron_fold.pretrain_gpt` runs Megatron-LM's pretrain_gpt.py on this machine.

- Megatron's dataset-helper build step never runs `make` where the wheel's compiled helpers import
  (dataset_helpers), on GPUs and CPUs alike.
- Without a CUDA device, the CPU tier (cpu_megatron_lm): the CPU arguments are added, Megatron's CUDA
  calls answered, and a failure ends with one line naming what stopped and where, instead of a traceback
  from every rank (MEGATRON_FOLD_TRACEBACK=1 shows the traceback). With CUDA nothing else changes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback

from megatron_fold import cpu_megatron_lm, dataset_helpers

__all__ = ["RunError", "on_cpu", "prepare", "report", "check_data_paths", "describe"]

TRACEBACK_ENV = "MEGATRON_FOLD_TRACEBACK"
# A failing rank other than 0 waits this long before printing: when rank 0 fails too it prints first and
# torchrun (which checks its ranks every 0.1 s) stops the others before they print the same line again.
_QUIET_RANK_DELAY_S = 3.0


class RunError(Exception):
    """Arguments this machine cannot run (exit status 2)."""


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def prepare(argv: list[str]) -> tuple[list[str], contextlib.AbstractContextManager]:
    """(Megatron-LM's arguments, the context to run pretrain_gpt.py in). Raises RunError."""
    check_data_paths(argv)
    added: list[str] = []
    if on_cpu():
        try:
            argv, added = cpu_megatron_lm.with_cpu_arguments(argv)
        except cpu_megatron_lm.CpuArgumentError as e:
            raise RunError(str(e)) from None
    return argv, _context(added)


_DATA_FLAGS = ("--data-path", "--train-data-path", "--valid-data-path", "--test-data-path")


def _values(argv: list[str], flag: str) -> list[str]:
    """Every value given to a multi-value flag (`--flag a b c` or `--flag=a`)."""
    values = []
    for i, arg in enumerate(argv):
        if arg == flag:
            for value in argv[i + 1:]:
                if value.startswith("--"):
                    break
                values.append(value)
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def _is_weight(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def check_data_paths(argv: list[str]) -> None:
    """A --data-path prefix without its .bin / .idx pair fails only after every rank built its model, in
    Megatron's dataset builder; say it before anything starts. Blend weights and object-storage paths
    (scheme://) are not files to check."""
    if "--mock-data" in argv:
        return
    for flag in _DATA_FLAGS:
        for prefix in _values(argv, flag):
            if _is_weight(prefix) or "://" in prefix:
                continue
            missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                raise RunError(f"{flag} {prefix}: no {' or '.join(missing)} (a prefix made by Megatron-LM's "
                               "tools/preprocess_data.py names both files without their extension)")


@contextlib.contextmanager
def _context(cpu_arguments_added: list[str]):
    with dataset_helpers.prebuilt_dataset_helpers():
        if not on_cpu():
            yield
            return
        if _rank() == 0:
            print("megatron-fold: no CUDA device: Megatron-LM trains on CPU ranks (gloo)"
                  + (f"; added {' '.join(cpu_arguments_added)}" if cpu_arguments_added else ""), flush=True)
        with cpu_megatron_lm.megatron_lm_on_cpu():
            yield


def _megatron_frame(error: BaseException) -> str | None:
    """'megatron/…/file.py:line' of the innermost frame in Megatron's code, where it stopped."""
    where = None
    for frame in traceback.extract_tb(error.__traceback__):
        path = frame.filename.replace(os.sep, "/")
        if "/megatron/" in path:
            where = "megatron/" + path.rsplit("/megatron/", 1)[1] + f":{frame.lineno}"
    return where


def _last_error_line(text: str, limit: int = 400) -> str:
    """The message of an error, on one line. torch.distributed.checkpoint's CheckpointException carries each
    rank's whole traceback as its text: its last line is the error that stopped that rank."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = lines[-1:]
    line = " ".join(lines)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe(error: BaseException) -> str:
    """One line: what stopped the run, and where in Megatron."""
    if isinstance(error, RunError | dataset_helpers.DatasetHelpersMissing):
        return str(error)  # ours: already worded for the user (may list several problems)
    message = _last_error_line(str(error))
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    where = _megatron_frame(error)
    at = f" (at {where})" if where else ""
    if any(frame.name == "load_checkpoint" for frame in traceback.extract_tb(error.__traceback__)):
        return f"the checkpoint given with --load does not load into this model{at}: {text}"
    if any(word in text for word in ("CUDA", "NVIDIA", "cuda")):
        return (f"this run reached a CUDA-only path that megatron-fold's CPU tier does not answer{at}: "
                f"{text}; run it on a GPU machine, or leave out the option that leads there")
    return f"Megatron-LM stopped{at}: {text}"


def report(error: BaseException) -> int:
    """Print `error` as one line, once per job; the exit status."""
    status = 2 if isinstance(error, RunError) else 1
    rank = _rank()
    if os.environ.get(TRACEBACK_ENV):
        traceback.print_exception(error)
    if rank != 0 and "WORLD_SIZE" in os.environ:
        time.sleep(_QUIET_RANK_DELAY_S)
    prefix = "megatron-fold: error" + (f" (rank {rank})" if rank else "")
    print(f"{prefix}: {describe(error)}", file=sys.stderr, flush=True)
    return status
