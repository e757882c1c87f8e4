"""Megatron-LM's own pretrain_gpt.py with the plugin's flags: the drop-in for an existing training command.

    python -m megatron_fold.pretrain_gpt [--megatron-lm DIR] [Megatron-LM arguments] --moe-fold \\
        [--moe-fold-drop-scope sequence] [--moe-fold-no-check-finite] [--moe-fold-no-metrics] \\
        [--moe-fold-log-interval N]
    torchrun ... -m megatron_fold.pretrain_gpt ...      (the same, one process per GPU)

Runs an unmodified `pretrain_gpt.py` from a Megatron-LM checkout: `--megatron-lm DIR`, else the
MEGATRON_LM_PATH environment variable, else the first `sys.path` entry holding `pretrain_gpt.py`. Before
it runs, the plugin flags join Megatron-LM's own parser (`--help` lists them under "megatron-fold") and
its argument validation (megatron_lm.install_arguments), and `--moe-fold` brings
`--spec megatron_fold.megatron_lm fold_layer_spec`, through which GPTModelBuilder builds FoldMoELayer.
Arguments the plugin cannot run with exit with status 2 and a message naming the flags, before any
GPU is touched; a checkout of another release than the installed megatron-core (its
megatron/core/package_info.py) too. Errors and notes are printed by rank 0 (or a process without RANK)
only. Unset CUDA_DEVICE_MAX_CONNECTIONS is set to 1, as Megatron-LM requires with TP or CP. Without a CUDA device the
run goes to gloo CPU ranks (pretrain_gpt_runtime, cpu_megatron_lm). Users who keep
a fork can apply patches/pretrain_gpt-core_v0.19.0.patch instead.
"""

from __future__ import annotations

import os
import re
import runpy
import sys
from importlib import metadata

from megatron_fold import cpu_megatron_lm, megatron_lm
from megatron_fold import pretrain_gpt_runtime as runtime

__all__ = ["main", "usage", "find_pretrain_gpt", "checkout_version", "check_checkout_version",
           "set_cuda_device_max_connections"]

ENV = "MEGATRON_LM_PATH"


def usage() -> str:
    return (f"usage: python -m megatron_fold.pretrain_gpt [--megatron-lm DIR] [Megatron-LM arguments] "
            f"{megatron_lm.plugin_usage()} (Megatron-LM's checkout: --megatron-lm DIR, else ${ENV}, else found on "
            "sys.path; Megatron-LM's own help follows)\n"
            "Without a CUDA device it trains on gloo CPU ranks (megatron_fold.cpu_megatron_lm), adding the "
            "arguments that needs: " + " ".join(f if v is None else f"{f} {v}" for f, v, _ in cpu_megatron_lm.CPU_ARGUMENTS))


class UsageError(Exception):
    """Printed as `megatron-fold: error: ...` with exit status 2."""


def _pop_megatron_lm(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take our own --megatron-lm DIR (or --megatron-lm=DIR) out of the arguments Megatron-LM will parse."""
    rest, where = [], None
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg == "--megatron-lm":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UsageError("--megatron-lm needs a directory: the Megatron-LM checkout holding pretrain_gpt.py")
            where = argv[i + 1]
            next(it)
        elif arg.startswith("--megatron-lm="):
            where = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return where, rest


def find_pretrain_gpt(directory: str | None = None) -> str:
    """The pretrain_gpt.py to run: in `directory`, else in $MEGATRON_LM_PATH, else on sys.path."""
    for source, where in (("--megatron-lm", directory), (ENV, os.environ.get(ENV) or None)):
        if where is not None:
            path = os.path.join(os.path.abspath(where), "pretrain_gpt.py")
            if not os.path.isfile(path):
                raise UsageError(f"{source} {where}: no pretrain_gpt.py there; point it at a Megatron-LM checkout "
                                 "(tag core_v0.19.0)")
            return path
    for entry in sys.path:
        path = os.path.join(os.path.abspath(entry or "."), "pretrain_gpt.py")
        if os.path.isfile(path):
            return path
    raise UsageError(f"cannot find Megatron-LM's pretrain_gpt.py: pass --megatron-lm DIR or set {ENV} to a "
                     "Megatron-LM checkout (tag core_v0.19.0), or put the checkout on PYTHONPATH")


def checkout_version(directory: str) -> str | None:
    """The Megatron-LM version of a checkout, from megatron/core/package_info.py (the file Megatron-LM's own
    packaging reads), or None when the checkout has no such file (a copy of the scripts only)."""
    try:
        with open(os.path.join(directory, "megatron", "core", "package_info.py")) as f:
            text = f.read()
    except OSError:
        return None
    fields = dict(re.findall(r"^(MAJOR|MINOR|PATCH|PRE_RELEASE)\s*=\s*['\"]?([\w.]*)['\"]?", text, re.M))
    if not all(k in fields for k in ("MAJOR", "MINOR", "PATCH")):
        raise UsageError(f"{directory}/megatron/core/package_info.py: cannot read MAJOR, MINOR and PATCH")
    return f"{fields['MAJOR']}.{fields['MINOR']}.{fields['PATCH']}{fields.get('PRE_RELEASE', '')}"


def check_checkout_version(script: str) -> None:
    """Megatron-LM's pretrain_gpt.py runs against the installed megatron-core wheel: their releases (major.minor)
    must agree, or the script calls an API the wheel does not have, or has changed. A checkout without
    package_info.py (the scripts alone) cannot say its release: accepted, with a note naming the wheel's."""
    directory = os.path.dirname(script)
    installed = metadata.version("megatron-core")
    found = checkout_version(directory)
    if found is None:
        if megatron_lm.is_first_rank():
            print(f"megatron-fold: note: {directory} has no megatron/core/package_info.py, so its Megatron-LM "
                  f"version is unknown; it must be a checkout of tag core_v{_release(installed)}.x, the release of "
                  f"the installed megatron-core {installed}", flush=True)
        return
    if _release(found) != _release(installed):
        raise UsageError(f"the Megatron-LM checkout {directory} is version {found}, but the installed megatron-core is "
                         f"{installed}: its pretrain_gpt.py needs the same release; check out tag "
                         f"core_v{_release(installed)}.0 (git -C {directory} checkout core_v{_release(installed)}.0)")


def _release(version: str) -> str:
    return ".".join(re.split(r"[.]", version)[:2])


def set_cuda_device_max_connections(argv: list[str]) -> None:
    """Megatron-LM asserts CUDA_DEVICE_MAX_CONNECTIONS=1 with TP or CP > 1 on GPUs before Blackwell (its
    communication overlap needs one hardware queue), and refuses 1 with FSDP. Set here when unset, before
    any CUDA context exists, with a note; a value the user exported stays."""
    if os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") is not None:
        return
    if any(a.split("=")[0] in ("--use-torch-fsdp2", "--use-megatron-fsdp", "--overlap-moe-expert-parallel-comm")
           for a in argv):
        return
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if megatron_lm.is_first_rank():
        print("megatron-fold: note: set CUDA_DEVICE_MAX_CONNECTIONS=1 (Megatron-LM requires it with tensor or "
              "context parallelism on GPUs before Blackwell); export it to choose another value", flush=True)


def _error(message: object) -> int:
    if megatron_lm.is_first_rank():  # every rank fails alike; one message, not one per rank
        print(f"megatron-fold: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        directory, argv = _pop_megatron_lm(argv)
        script = find_pretrain_gpt(directory)
        check_checkout_version(script)
    except UsageError as e:
        return _error(e)
    if "-h" in argv or "--help" in argv:
        print(usage(), flush=True)
    set_cuda_device_max_connections(argv)
    try:
        argv, context = runtime.prepare(argv)
    except runtime.RunError as e:
        return runtime.report(e)  # exit status 2 for a RunError
    megatron_lm.install_arguments()
    saved_argv, saved_path = sys.argv, list(sys.path)
    # As `python pretrain_gpt.py` would: its directory first (gpt_builders, model_provider). The wheel's
    # `megatron` package is imported already, so a checkout's megatron/ does not replace it.
    sys.path.insert(0, os.path.dirname(script))
    sys.argv = [script, *megatron_lm.with_fold_spec(argv)]
    try:
        with context:
            runpy.run_path(script, run_name="__main__")
    except megatron_lm.FoldArgumentError as e:
        return _error(e)
    except BaseException as e:  # noqa: BLE001 - on CPU ranks: one line instead of a traceback per rank
        # (BaseException: torch.distributed.checkpoint's CheckpointException derives from it directly)
        if isinstance(e, SystemExit | KeyboardInterrupt) or not runtime.on_cpu():
            raise
        return runtime.report(e)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        megatron_lm.uninstall_arguments()
    return 0


if __name__ == "__main__":
    sys.exit(main())
