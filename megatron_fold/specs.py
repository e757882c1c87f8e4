"""Module specs for FoldMoELayer, and install()/uninstall() into Megatron's stock spec builders.

Megatron-Core 0.19 builds a GPT layer's MoE block with `get_moe_module_spec_for_backend(backend, ...)`,
which returns a builder (a partial of MoELayer). Ours has the same signature and returns a partial of
FoldMoELayer with FoldRouter, Megatron's own experts (SequentialMLP, or TEGroupedMLP where Transformer
Engine provides it) and shared experts. `install()` points Megatron's builder at ours, so stock GPT /
Mixtral / Qwen2-MoE specs (and Megatron-LM's pretrain_gpt.py) build FoldMoELayer without other changes.
"""

from __future__ import annotations

import contextlib
import copy
import functools

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt import gpt_layer_specs, moe_module_specs

from megatron_fold.moe.capacity import DropScope
from megatron_fold.moe.layer import FoldMoELayer
from megatron_fold.moe.router import FoldRouter

__all__ = [
    "get_fold_moe_module_spec",
    "get_fold_moe_module_spec_for_backend",
    "install",
    "uninstall",
    "is_installed",
    "installed",
]


def get_fold_moe_module_spec_for_backend(
    backend: BackendSpecProvider,
    num_experts: int | None = None,
    moe_grouped_gemm: bool | None = False,
    use_te_activation_func: bool = False,
    *,
    drop_scope: DropScope | str = DropScope.SUBSEQUENCE,
    check_finite: bool = False,
    metrics: bool = True,
):
    """Counterpart of Megatron's get_moe_module_spec_for_backend, building FoldMoELayer.

    Megatron's own builder composes the experts and shared experts for the backend; we keep its
    submodules and swap only the layer class and the router.
    """
    if num_experts is None:
        raise ValueError("get_fold_moe_module_spec_for_backend needs num_experts (the MoE block is for MoE layers)")
    drop_scope = DropScope.parse(drop_scope)
    upstream = _ORIGINAL[moe_module_specs](backend, num_experts, moe_grouped_gemm, use_te_activation_func)
    submodules = copy.copy(upstream.keywords["submodules"])
    submodules.router = FoldRouter
    return functools.partial(
        FoldMoELayer,
        submodules=submodules,
        drop_scope=drop_scope,
        check_finite=check_finite,
        metrics=metrics,
    )


def get_fold_moe_module_spec(
    use_te: bool | None = None,
    num_experts: int | None = None,
    moe_grouped_gemm: bool | None = False,
    *,
    drop_scope: DropScope | str = DropScope.SUBSEQUENCE,
    check_finite: bool = False,
    metrics: bool = True,
):
    """Counterpart of Megatron's get_moe_module_spec. `use_te=None` uses TE when it is installed."""
    if use_te is None:
        use_te = _have_transformer_engine()
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend: BackendSpecProvider = TESpecProvider()
    else:
        backend = LocalSpecProvider()
    return get_fold_moe_module_spec_for_backend(
        backend, num_experts, moe_grouped_gemm, drop_scope=drop_scope, check_finite=check_finite, metrics=metrics
    )


def _have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


# Every module that looks the builder up by name at spec-building time.
_PATCH_TARGETS = (moe_module_specs, gpt_layer_specs)
_ORIGINAL = {m: m.get_moe_module_spec_for_backend for m in _PATCH_TARGETS}


def install(*, drop_scope: DropScope | str = DropScope.SUBSEQUENCE, check_finite: bool = False,
            metrics: bool = True) -> None:
    """Make Megatron's stock MoE spec builders build FoldMoELayer with these plugin options."""
    builder = functools.partial(
        get_fold_moe_module_spec_for_backend, drop_scope=DropScope.parse(drop_scope), check_finite=check_finite,
        metrics=metrics,
    )
    for module in _PATCH_TARGETS:
        module.get_moe_module_spec_for_backend = builder


def uninstall() -> None:
    """Restore Megatron's own MoE spec builders."""
    for module, original in _ORIGINAL.items():
        module.get_moe_module_spec_for_backend = original


def is_installed() -> bool:
    return any(m.get_moe_module_spec_for_backend is not _ORIGINAL[m] for m in _PATCH_TARGETS)


@contextlib.contextmanager
def installed(fold: bool = True, **options):
    """Stock spec builders build FoldMoELayer (`fold=True`, with `options` as for install()) or
    Megatron's own MoELayer (`fold=False`) inside the block; whatever was installed before is restored."""
    saved = {m: m.get_moe_module_spec_for_backend for m in _PATCH_TARGETS}
    if fold:
        install(**options)
    else:
        uninstall()
    try:
        yield
    finally:
        for module, builder in saved.items():
            module.get_moe_module_spec_for_backend = builder
