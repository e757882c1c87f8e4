"""CPU tier for Megatron-LM's training loop: an unmodified pretrain_gpt.py trains on gloo CPU ranks.

Why: no GPU is lent to every machine that must prove the drop-in (`python -m megatron_fold.pretrain_gpt
... --moe-fold`), CI included. `megatron_fold.cpu` already answers Megatron-Core's CUDA calls (model,
DDP, optimizers, schedules, dist_checkpointing); Megatron-LM's training package (initialize, training
loop, checkpointing, logging) makes a few more, and this module answers exactly those, each listed in
SITES with the Megatron file and line that makes the call, the way a machine whose only device is the
CPU would. Nothing in Megatron's files is edited: the answers are attribute replacements made by
`megatron_lm_on_cpu()` and undone when it exits.

It also supplies the Megatron-LM arguments a CPU run needs and a user would otherwise have to know
(CPU_ARGUMENTS): gloo, the local transformer implementation, the CUDA-only fusions off. A value the
user gave that only a GPU can run is refused with one line naming it.

Safety: `megatron_lm_on_cpu()` enters `megatron_fold.cpu.cpu_mode()`, which refuses to start where
`torch.cuda.is_available()`; `python -m megatron_fold.pretrain_gpt` enters it only on such machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import resource

import torch

from megatron_fold import cpu

__all__ = ["CPU_ARGUMENTS", "SITES", "Site", "CpuArgumentError", "with_cpu_arguments", "megatron_lm_on_cpu"]


class CpuArgumentError(ValueError):
    """A Megatron-LM argument that only a GPU can run was given on a machine without CUDA."""


# (flag, value or None for a switch, the values a CPU run refuses for it). Added when the user did not
# give the flag; `--transformer-impl transformer_engine` needs Transformer Engine's CUDA kernels, the
# fusions are CUDA or torch.compile kernels (torch.compile on CPU needs a C++ tool chain and minutes),
# gradient-accumulation fusion is an Apex / TE CUDA kernel, the persistent layer norm is Apex's.
CPU_ARGUMENTS: list[tuple[str, str | None, tuple[str, ...]]] = [
    ("--distributed-backend", "gloo", ("nccl",)),
    ("--transformer-impl", "local", ("transformer_engine", "inference_optimized")),
    ("--no-persist-layer-norm", None, ()),
    ("--no-gradient-accumulation-fusion", None, ()),
    ("--no-masked-softmax-fusion", None, ()),
    ("--no-bias-gelu-fusion", None, ()),
    ("--no-bias-swiglu-fusion", None, ()),
    ("--no-bias-dropout-fusion", None, ()),
    ("--no-rope-fusion", None, ()),
]
# Flags that select a CUDA-only feature: refused on CPU whatever their value.
_GPU_ONLY_FLAGS = ("--moe-grouped-gemm", "--use-flash-attn", "--tp-comm-overlap", "--cross-entropy-loss-fusion",
                   "--enable-cuda-graph", "--fp8-format")


def _given(argv: list[str], flag: str) -> str | None:
    """The value given for `flag` ('' for a switch), or None when it is absent (last one wins, as argparse)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def with_cpu_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv with the CPU arguments the user did not give, the arguments added).

    Raises CpuArgumentError naming a given flag that needs CUDA."""
    added: list[str] = []
    for flag, value, refused in CPU_ARGUMENTS:
        given = _given(argv, flag)
        if given is None:
            added += [flag] if value is None else [flag, value]
        elif given in refused:
            raise CpuArgumentError(f"{flag} {given} needs a CUDA device and this machine has none; on CPU ranks "
                                   f"run {flag} {value} (or leave it out: the CPU tier sets it)")
    for flag in _GPU_ONLY_FLAGS:
        if _given(argv, flag) is not None:
            raise CpuArgumentError(f"{flag} needs a CUDA device and this machine has none; leave it out on CPU ranks")
    return [*argv, *added], added


# ---- the answers -------------------------------------------------------------------------------------

def _no_op(*args, **kwargs):
    return None


class _CudaOfCpuMachine:
    """`torch.cuda` as Megatron-LM's training modules see it on a machine whose one device is the CPU.

    Only what those modules ask is answered; anything else is torch.cuda itself (and fails as it would)."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def device_count() -> int:
        # initialize.py:270 / :447: "is there a device for this rank": the CPU. With 0 Megatron silently
        # skips building its model-parallel groups (:358) and seeding the model-parallel RNG (:447).
        return 1

    @staticmethod
    def set_device(device) -> None:
        # initialize.py:282: bind the rank to its device; every rank shares the one CPU.
        return None

    @staticmethod
    def get_rng_state(device="cuda") -> torch.Tensor:
        # The default generator of the device Megatron computes on is the CPU's.
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state, device="cuda") -> None:
        torch.set_rng_state(new_state)

    empty_cache = staticmethod(_no_op)  # nothing cached: CPU tensors are freed when dropped


class _TorchOfCpuMachine(cpu._TorchWithCpuDevice):
    """`torch` for one Megatron-LM module: `device="cuda"` tensors are made on the CPU (megatron_fold.cpu's
    stand-in) and `torch.cuda` is _CudaOfCpuMachine."""

    def __init__(self):
        super().__init__()
        self.cuda = _CudaOfCpuMachine()


_TORCH = _TorchOfCpuMachine()


def _initialize_megatron_without_cuda(original):
    def initialize_megatron(*args, **kwargs):
        # initialize.py:66 asserts torch.cuda.is_available() unless allow_no_cuda; the CPU is the device here.
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    return initialize_megatron


def _no_device_architecture():
    """common_utils.py:504 get_device_arch_version (asked by arguments.py:1414 with TP or CP > 1, :1444,
    :1484): the CPU has no CUDA architecture; 0 is below every threshold Megatron compares with (the
    pre-Blackwell branches, which only warn about CUDA_DEVICE_MAX_CONNECTIONS)."""
    return 0


def _report_host_memory(name, process_group=None):
    """common_utils.py:313 report_memory prints CUDA allocator statistics, all zero without CUDA; on CPU
    ranks the memory in use is the process's, so its peak resident set is printed instead."""
    from megatron.core import parallel_state as mpu

    rank_in_dp = torch.distributed.get_rank(process_group) if process_group is not None else mpu.get_data_parallel_rank()
    if rank_in_dp == 0:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
        print(f"[Rank {torch.distributed.get_rank()}] {name} memory (MB) | CPU rank, max resident: {peak:.2f}",
              flush=True)


@dataclasses.dataclass(frozen=True)
class Site:
    """One CUDA-only call on Megatron-LM's training path and its CPU answer."""

    where: str  # Megatron file:line(s) under the wheel's megatron/ (tests check each line makes the call)
    call: str  # what Megatron does there
    module: str  # the module whose attribute is replaced
    attribute: str
    answer: object  # the replacement, or a callable(original) -> replacement when `wraps`
    wraps: bool = False


# Every module listed with attribute "torch" sees _TORCH: its device="cuda" literals make CPU tensors and
# its torch.cuda calls are _CudaOfCpuMachine's.
SITES: list[Site] = [
    Site("training/initialize.py:66", "assert torch.cuda.is_available() in initialize_megatron",
         "megatron.training.training", "initialize_megatron", _initialize_megatron_without_cuda, wraps=True),
    Site("training/initialize.py:270,282,358,447,509,518,540,545,547,558",
         "torch.cuda.device_count() == 0 skips model-parallel groups and RNG seeding; set_device; "
         "JIT warm-up tensors on device='cuda'; empty_cache",
         "megatron.training.initialize", "torch", _TORCH),
    Site("training/initialize.py:473,497 (set_jit_fusion_options and its _warmup_jit_function, called at training/training.py:1117)",
         "warms up the bias-GeLU / SwiGLU / dropout-add fusions with CUDA tensors",
         "megatron.training.training", "set_jit_fusion_options", _no_op),
    Site("training/utils/common_utils.py:504 (via training/arguments.py:1414,1444,1484)",
         "get_device_arch_version: torch.cuda.get_device_properties('cuda:0')",
         "megatron.training.arguments", "get_device_arch_version", _no_device_architecture),
    Site("training/utils/common_utils.py:55,60,222,223,227", "gradient-norm buffers on device='cuda'",
         "megatron.training.utils.common_utils", "torch", _TORCH),
    Site("training/utils/common_utils.py:313 (report_memory, called at training/training.py:2916,2927)",
         "CUDA allocator statistics", "megatron.training.training", "report_memory", _report_host_memory),
    Site("training/training.py:1131,1137,2613,2884,3297,4270,4298,4377,4379,4588,4591,4644,4653",
         "start-time, loss-sum, exit-flag and eval-iteration tensors on device='cuda'; empty_cache",
         "megatron.training.training", "torch", _TORCH),
    Site("core/rerun_state_machine.py:264,268,979,992",
         "all-reduced flags on device='cuda'; torch.cuda.get_rng_state / set_rng_state",
         "megatron.core.rerun_state_machine", "torch", _TORCH),
    Site("training/checkpointing.py:375,417,2665,2677",
         "iteration all-reduce on device='cuda'; torch.cuda.get_rng_state / set_rng_state in the RNG state",
         "megatron.training.checkpointing", "torch", _TORCH),
]


_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


@contextlib.contextmanager
def megatron_lm_on_cpu():
    """Megatron-Core in CPU mode plus every SITES answer, for the duration of the block; restored after."""
    saved: list[tuple[object, str, object]] = []
    # arguments.py:1437 asserts CUDA_DEVICE_MAX_CONNECTIONS=1 with TP or CP > 1 before Blackwell (so that
    # one CUDA connection keeps communication kernels in issue order); CPU work is in issue order anyway.
    saved_connections = os.environ.get(_CONNECTIONS)
    os.environ[_CONNECTIONS] = "1"
    with cpu.cpu_mode():
        try:
            for site in SITES:
                owner = importlib.import_module(site.module)
                original = getattr(owner, site.attribute)
                saved.append((owner, site.attribute, original))
                setattr(owner, site.attribute, site.answer(original) if site.wraps else site.answer)
            yield
        finally:
            for owner, attribute, original in reversed(saved):
                setattr(owner, attribute, original)
            if saved_connections is None:
                os.environ.pop(_CONNECTIONS, None)
            else:
                os.environ[_CONNECTIONS] = saved_connections
