"""Megatron's compiled dataset helpers: use the ones the wheel ships instead of running `make`.

Why: Megatron-LM's initialize.py:178 (`_compile_dependencies`) has rank 0 run `make -C
megatron/core/datasets` before the first iteration. A source checkout has a Makefile there; the
megatron-core wheel has none but ships the compiled `helpers_cpp` extension, so rank 0 exits 1 (on GPUs
and CPUs alike). `prebuilt_dataset_helpers()` answers `megatron.core.datasets.utils.compile_helpers`
(looked up by name when initialize.py calls it): when `helpers_cpp` imports there is nothing to build;
when it does not and a Makefile is there, Megatron's own build runs; otherwise the error says what to
install.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["DatasetHelpersMissing", "prebuilt_dataset_helpers", "compile_helpers"]


class DatasetHelpersMissing(RuntimeError):
    """Neither compiled dataset helpers nor a Makefile to build them."""


def _helpers_import() -> bool:
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def compile_helpers(original) -> None:
    """What initialize.py's build step does, given Megatron's own compile_helpers as `original`."""
    if _helpers_import():
        return
    import megatron.core.datasets as datasets

    directory = os.path.dirname(os.path.abspath(datasets.__file__))
    if os.path.isfile(os.path.join(directory, "Makefile")):
        original()
        return
    raise DatasetHelpersMissing(
        f"Megatron's compiled dataset helpers (megatron.core.datasets.helpers_cpp) do not import and {directory} "
        "has no Makefile to build them: install the megatron-core wheel, which ships them "
        "(pip install 'megatron-core==0.19.*'), or point PYTHONPATH at a Megatron-LM source checkout and "
        "build them there (pip install pybind11; make -C megatron/core/datasets)")


@contextlib.contextmanager
def prebuilt_dataset_helpers():
    """For the block, Megatron's compile_helpers builds nothing when the compiled helpers import."""
    from megatron.core.datasets import utils

    original = utils.compile_helpers
    utils.compile_helpers = lambda: compile_helpers(original)
    try:
        yield
    finally:
        utils.compile_helpers = original
