"""The GPU boundary of the MoE block: Transformer Engine's fused kernels and CUDA side streams.

Why one module: router.py, dispatcher.py and layer.py stay device-agnostic (no torch.cuda call, no
Transformer Engine import); whatever only exists on a GPU is decided and reached here, the way cpu.py
is the one place that answers Megatron's CUDA calls on a CPU machine.

- moe_router_fusion: Megatron's own routing helpers with fused=True, i.e. TE's
  fused_topk_with_score_function, fused_compute_score_for_moe_aux_loss and fused_moe_aux_loss (the
  kernels Megatron's TopKRouter uses).
- moe_permute_fusion: Megatron's moe_utils.permute / unpermute with fused=True, i.e. TE's
  moe_permute_with_probs and moe_unpermute (the kernels Megatron's alltoall dispatcher uses) for the
  local permutation before and after FlexFoldDispatcher's collectives, which stay ours; and
  moe_utils.sort_chunks_by_idxs with fused=True (TE's moe_sort_chunks_by_index) for its chunk sort.
- moe_shared_expert_overlap: Megatron's SharedExpertMLP runs its overlapped stages on its own side
  stream; it can create one where CUDA is available (or in CPU mode, whose streams are synchronous).

A fused path runs when its flag is set, Transformer Engine provides the kernels and the tensors are on
a CUDA device. Otherwise the portable path runs (same numbers up to rounding) and a warning says so
once per process and reason: a flag is never dropped without a word. On a machine with CUDA but
without the kernels, `fusion_unavailable_reason` lets validate_fold_moe_config refuse the flag up front.

Untested without a GPU: the TE calls below (scripts/gpu_flag_parity.py checks them against the
portable path where a GPU with TE is available).
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["router_fusion", "permute_fusion", "fused_permute_can_run", "fused_permute", "fused_unpermute", "sort_chunks",
           "side_streams_available",
           "fusion_unavailable_reason"]

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _moe_utils():
    from megatron.core.transformer.moe import moe_utils

    return moe_utils


def _have_router_kernels() -> bool:
    u = _moe_utils()
    return None not in (u.fused_topk_with_score_function, u.fused_compute_score_for_moe_aux_loss,
                        u.fused_moe_aux_loss)


def _have_permute_kernels() -> bool:
    u = _moe_utils()
    return None not in (u.fused_permute_with_probs, u.fused_unpermute, u.fused_sort_chunks_by_index,
                        u.fused_sort_chunks_by_index_with_probs)


def te_version():
    """The installed Transformer Engine's version (packaging Version), or None without TE."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        return None
    from megatron.core.utils import get_te_version

    return get_te_version()


# The first Transformer Engine whose fused router has the sqrtsoftplus score function (Megatron-Core 0.19's
# topk_routing_with_score_function raises below it; TE's own kernel knows only softmax and sigmoid there).
SQRTSOFTPLUS_MIN_TE = "2.13.0"


def te_refusals(config) -> list[str]:
    """Configurations Transformer Engine's fused kernels refuse at their first forward, named before
    anything is built. Decided from the configuration and the installed TE version, on any machine
    that has TE: a CPU run of such a configuration would take the portable path and hide the problem."""
    problems = []
    if config.moe_router_fusion and getattr(config, "moe_router_dtype", None) == "fp64":
        # On every machine: TE's fused router computes in fp32 ("FP64 is currently not supported").
        problems.append("moe_router_fusion=True with moe_router_dtype='fp64': Transformer Engine's fused router "
                        "kernels compute in fp32 and do not take fp64 logits; set moe_router_dtype='fp32' or "
                        "moe_router_fusion=False")
    version = te_version()
    if (config.moe_router_fusion and config.moe_router_score_function == "sqrtsoftplus" and version is not None
            and version < _version(SQRTSOFTPLUS_MIN_TE)):
        problems.append(f"moe_router_fusion=True with moe_router_score_function='sqrtsoftplus' needs Transformer "
                        f"Engine >= {SQRTSOFTPLUS_MIN_TE} (installed: {version}); upgrade it or set "
                        "moe_router_fusion=False")
    return problems


def _version(text: str):
    from packaging.version import Version

    return Version(text)


def fusion_unavailable_reason(config) -> str | None:
    """Why a fusion flag set in `config` cannot take effect on this machine's GPUs, or None.

    Only a machine with CUDA can tell: on a CPU machine every run takes the portable path (warned at
    the first forward), which is what a CPU run of a GPU configuration is for."""
    if not torch.cuda.is_available():
        return None
    missing = []
    if config.moe_router_fusion and not _have_router_kernels():
        missing.append("moe_router_fusion=True needs Transformer Engine >= 2.7 (fused_topk_with_score_function, "
                       "fused_moe_aux_loss); install it or set moe_router_fusion=False")
    if config.moe_permute_fusion and not _have_permute_kernels():
        missing.append("moe_permute_fusion=True needs Transformer Engine >= 2.1 (moe_permute_with_probs, "
                       "moe_unpermute); install it or set moe_permute_fusion=False")
    return "; ".join(missing) or None


def router_fusion(config, logits: torch.Tensor) -> bool:
    """Whether this forward routes with TE's fused kernels (moe_router_fusion)."""
    if not config.moe_router_fusion:
        return False
    if not logits.is_cuda:
        _warn_once(f"router-device-{logits.device.type}",
                   f"moe_router_fusion=True: router logits are on {logits.device.type}, and Transformer Engine's "
                   "fused routing kernels need CUDA tensors; FoldRouter routes with the portable path (same "
                   "numbers up to rounding)")
        return False
    if not _have_router_kernels():
        _warn_once("router-no-te", "moe_router_fusion=True: Transformer Engine's fused routing kernels are not "
                                   "installed; FoldRouter routes with the portable path")
        return False
    return True


def permute_fusion(config, hidden: torch.Tensor, padded: bool) -> bool:
    """Whether this dispatch permutes with TE's fused kernels (moe_permute_fusion)."""
    if not config.moe_permute_fusion:
        return False
    if padded:
        _warn_once("permute-padded",
                   "moe_permute_fusion=True with moe_pad_expert_input_to_capacity=True: FlexFoldDispatcher's "
                   "static drop-and-pad layout (every expert block padded to its capacity) has no Transformer "
                   "Engine kernel; the portable permutation runs")
        return False
    if not hidden.is_cuda:
        _warn_once(f"permute-device-{hidden.device.type}",
                   f"moe_permute_fusion=True: hidden states are on {hidden.device.type}, and Transformer Engine's "
                   "fused permutation needs CUDA tensors; FlexFoldDispatcher permutes with the portable path "
                   "(same numbers up to rounding)")
        return False
    if not _have_permute_kernels():
        _warn_once("permute-no-te", "moe_permute_fusion=True: Transformer Engine's fused permutation is not "
                                    "installed; FlexFoldDispatcher permutes with the portable path")
        return False
    return True


def fused_permute_can_run(num_out: int) -> bool:
    """Whether TE's fused permute can take `num_out` output rows. Transformer Engine 2.15 added
    `assert num_out_tokens > 0` to moe_permute_with_probs: a rank whose routed tokens were all dropped
    (sequence-scope dropping can leave one with none) or that holds no token must not call it. The
    portable permutation of zero rows is exact, so it runs instead, on every TE version."""
    return num_out > 0


def fused_permute(hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor, num_out: int):
    """[N, H], probs [N, E], map [N, E] -> rows [M, H] expert-major (tokens in order inside an expert, the
    portable path's order), their probs [M], and TE's row map for fused_unpermute."""
    rows, row_probs, row_id_map, _, _ = _moe_utils().permute(hidden, routing_map, probs=probs, num_out_tokens=num_out,
                                                             fused=True)
    return rows, row_probs, row_id_map


def fused_unpermute(rows: torch.Tensor, row_id_map: torch.Tensor, routing_map: torch.Tensor,
                    num_tokens: int) -> torch.Tensor:
    """Rows [M, H] -> [N, H], each token's rows summed (the experts already applied the probabilities)."""
    return _moe_utils().unpermute(rows, row_id_map, restore_shape=torch.Size((num_tokens, rows.shape[-1])),
                                  routing_map=routing_map, fused=True)


def sort_chunks(rows: torch.Tensor, split_sizes: torch.Tensor, order: torch.Tensor, probs: torch.Tensor | None = None):
    """Rows [M, H] (and probs [M]) cut into chunks of `split_sizes` (a device tensor) and laid out in
    `order`: Megatron's moe_utils.sort_chunks_by_idxs with fused=True, i.e. TE's moe_sort_chunks_by_index
    (with_probs), as Megatron's alltoall dispatcher calls it. Returns (rows, probs or None)."""
    return _moe_utils().sort_chunks_by_idxs(rows, split_sizes, order, probs=probs, fused=True)


def gating_gemm_can_run(inp: torch.Tensor) -> bool:
    """Whether Megatron's router_gating_linear can run on `inp`: everywhere except CPU tensors on a
    machine with Transformer Engine, whose GEMM (the one it then calls) needs CUDA tensors."""
    return inp.is_cuda or _moe_utils().te_general_gemm is None


def side_streams_available() -> bool:
    """Whether Megatron's SharedExpertMLP can create its overlap side stream here: on a machine with CUDA,
    or in CPU mode (megatron_fold.cpu answers torch.cuda.Stream with a synchronous stand-in)."""
    from megatron_fold import cpu

    return torch.cuda.is_available() or cpu.is_active()
