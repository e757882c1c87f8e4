"""megatron-fold: MoE Parallel Folding (arXiv 2504.14960) as a Megatron-Core plugin.

Importing the package checks the installed megatron-core against the supported range, because the
plugin subclasses Megatron's MoE classes and mirrors its rank generator: another minor release may
change either silently.
"""

from importlib import metadata as _metadata

__version__ = "0.1.0"

SUPPORTED_MEGATRON_CORE = (">=0.19", "<0.20")


def _check_megatron_core_version() -> None:
    try:
        installed = _metadata.version("megatron-core")
    except _metadata.PackageNotFoundError as e:
        raise ImportError(
            "megatron-fold needs megatron-core >=0.19,<0.20, but megatron-core is not installed; "
            "run: pip install 'megatron-core>=0.19,<0.20'"
        ) from e
    parts = installed.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError) as e:
        raise ImportError(f"cannot parse the installed megatron-core version {installed!r}") from e
    if (major, minor) != (0, 19):
        raise ImportError(
            f"megatron-fold supports megatron-core >=0.19,<0.20, but megatron-core {installed} is "
            "installed; run: pip install 'megatron-core>=0.19,<0.20'"
        )


_check_megatron_core_version()

from megatron_fold.layout import FoldedLayout, LayoutError  # noqa: E402

# The MoE modules import torch and megatron-core (seconds); `megatron-fold explain/plan` need neither,
# so they load on first use.
_LAZY = {
    "FoldMoELayer": "megatron_fold.moe.layer",
    "FoldRouter": "megatron_fold.moe.router",
    "FlexFoldDispatcher": "megatron_fold.moe.dispatcher",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_fold' has no attribute {name!r}")


__all__ = ["FoldedLayout", "LayoutError", "FoldMoELayer", "FoldRouter", "FlexFoldDispatcher", "__version__"]
