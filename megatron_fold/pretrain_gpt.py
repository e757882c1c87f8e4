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
GPU is touched. Without a CUDA device the run goes to gloo CPU ranks (pretrain_gpt_runtime, cpu_megatron_lm). Users who keep a fork can apply patches/pretrain_gpt-core_v0.19.0.patch instead.
"""

from __future__ import annotations

import os
import runpy
import sys

from megatron_fold import cpu_megatron_lm, megatron_lm
from megatron_fold import pretrain_gpt_runtime as runtime

__all__ = ["main", "find_pretrain_gpt"]

ENV = "MEGATRON_LM_PATH"
USAGE = ("usage: python -m megatron_fold.pretrain_gpt [--megatron-lm DIR] [Megatron-LM arguments] --moe-fold "
         "[--moe-fold-drop-scope {subsequence,sequence}] (Megatron-LM's checkout: --megatron-lm DIR, else "
         f"${ENV}, else found on sys.path; Megatron-LM's own help follows)\n"
         "Without a CUDA device it trains on gloo CPU ranks (megatron_fold.cpu_megatron_lm), adding the arguments "
         "that needs: " + " ".join(f if v is None else f"{f} {v}" for f, v, _ in cpu_megatron_lm.CPU_ARGUMENTS))


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        directory, argv = _pop_megatron_lm(argv)
        script = find_pretrain_gpt(directory)
    except UsageError as e:
        print(f"megatron-fold: error: {e}", file=sys.stderr)
        return 2
    if "-h" in argv or "--help" in argv:
        print(USAGE, flush=True)
    try:
        argv, context = runtime.prepare(argv)
    except runtime.RunError as e:
        runtime.report(e)
        return 2
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
        return runtime.report(runtime.RunError(str(e)))
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
