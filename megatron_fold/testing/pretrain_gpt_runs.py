"""Megatron-LM's own pretrain_gpt.py under torchrun, its logged losses, and the layout comparison.

Why here: the CPU tier's tests (tests/megatron_lm/) and the 8-GPU smoke test (scripts/smoke_8gpu.sh part
(b)) run the same comparison with the same thresholds: one reference run under the first layout trains
`iters` iterations from scratch and saves a torch_dist checkpoint at `resume_at`; every other layout loads
that checkpoint and trains the remaining iterations; their per-iteration losses, parsed from Megatron-LM's
own log, must equal the reference's within LOSS_RTOL. The same checkpoint makes the comparison fair
(Megatron initialises weights per rank, so two layouts never start from the same weights on their own)
and proves the resume: a run saved under one layout and loaded under another continues as the
uninterrupted run does. A control loads the same checkpoint with subsequence-scope drops (Megatron's
own semantics), whose losses must differ, so the comparison is shown able to fail.

    python -m megatron_fold.testing.pretrain_gpt_runs --out DIR [--iters 20] [--resume-at 10] \\
        [--megatron-lm DIR] [--no-control] -- <model and data arguments>
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import signal
import subprocess
import sys

__all__ = ["LOSS_RTOL", "LOSS_RTOL_BF16", "MODEL_ARGS", "LAYOUTS", "FOLD_ARGS", "CONTROL_ARGS", "Run", "torchrun", "losses",
           "largest_relative_difference", "LayoutComparison", "compare_layouts", "main"]

LOSS_RTOL = 1e-5
# bf16 runs (the 8-GPU smoke test: Transformer Engine has no fp32 attention under CP): the bound of the
# CPU tier's bf16 whole-model test (tests/distributed/test_whole_model.py, BF16_RTOL); the subsequence-scope
# control must still exceed it. Not yet measured on GPUs.
LOSS_RTOL_BF16 = 1e-4
# A Mixtral-like model, tiny: 4 layers (the first dense, as DeepSeek-style models have it), 8 experts top 2,
# GQA, RoPE, SwiGLU, RMSNorm, capacity factor 1 (tokens are dropped, so the drop scope matters), no dropout.
MODEL_ARGS = [
    "--num-layers=4", "--hidden-size=64", "--num-attention-heads=4", "--group-query-attention",
    "--num-query-groups=2", "--ffn-hidden-size=128", "--moe-ffn-hidden-size=64", "--num-experts=8",
    "--moe-router-topk=2", "--moe-layer-freq=([0]+[1]*3)", "--swiglu", "--normalization=RMSNorm",
    "--position-embedding-type=rope", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--seq-length=64", "--max-position-embeddings=64", "--micro-batch-size=1", "--global-batch-size=8",
    "--moe-router-load-balancing-type=aux_loss", "--moe-aux-loss-coeff=1e-2", "--moe-expert-capacity-factor=1.0",
    "--attention-dropout=0", "--hidden-dropout=0", "--lr=1e-3", "--min-lr=1e-4", "--lr-decay-style=cosine",
    "--lr-warmup-iters=2", "--seed=1234", "--log-interval=1", "--eval-interval=1000", "--eval-iters=0",
    # Megatron pads the vocabulary to a multiple of this times TP: the default (128) pads a vocabulary of
    # 128 to 256 under TP 2 and leaves it at 128 under TP 1, two different models (more logits).
    "--make-vocab-size-divisible-by=64",
]
# Folded layouts on 8 ranks (name: Megatron-LM arguments); the first is the reference.
LAYOUTS = {
    "tp2-sp-ep4-etp1": ["--tensor-model-parallel-size=2", "--sequence-parallel", "--expert-model-parallel-size=4",
                        "--expert-tensor-parallel-size=1"],
    "cp2-pp2-ep4-etp1": ["--context-parallel-size=2", "--pipeline-model-parallel-size=2",
                         "--expert-model-parallel-size=4", "--expert-tensor-parallel-size=1"],
    "tp2-sp-ep2-etp2": ["--tensor-model-parallel-size=2", "--sequence-parallel", "--expert-model-parallel-size=2",
                        "--expert-tensor-parallel-size=2"],
}
FOLD_ARGS = ["--moe-fold", "--moe-fold-drop-scope=sequence"]
CONTROL_ARGS = ["--moe-fold", "--moe-fold-drop-scope=subsequence"]
_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.eE+-]+) \|")


@dataclasses.dataclass
class Run:
    """One torchrun: its exit status, torchrun's own output, and each rank's stdout + stderr."""

    name: str
    returncode: int
    output: str
    ranks: dict[int, str]
    timed_out: bool = False

    @property
    def rank_output(self) -> str:
        return "\n".join(self.ranks[r] for r in sorted(self.ranks))

    def tail(self, chars: int = 4000) -> str:
        return f"--- {self.name}: exit {self.returncode}\n{self.output[-chars:]}\n--- ranks:\n{self.rank_output[-chars:]}"


def torchrun(name: str, args: list[str], out_dir: str, nproc: int = 8, megatron_lm: str | None = None,
             timeout: float = 600, env: dict | None = None) -> Run:
    """`torchrun --nproc-per-node nproc -m megatron_fold.pretrain_gpt [--megatron-lm DIR] args`; each rank's
    output in its own file. On timeout the whole process group (torchrun and every rank) is killed."""
    log_dir = os.path.join(out_dir, name)
    os.makedirs(log_dir, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--log-dir={log_dir}", "--redirects=3", "-m", "megatron_fold.pretrain_gpt"]
    if megatron_lm:
        command += ["--megatron-lm", megatron_lm]
    process = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {})}, start_new_session=True)
    timed_out = False
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    finally:  # interrupted (a test's timeout, ^C): no rank outlives its caller
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    ranks = {}
    for path in glob.glob(os.path.join(log_dir, "*", "attempt_0", "*", "std*.log")):
        rank = int(os.path.basename(os.path.dirname(path)))
        with open(path, errors="replace") as f:
            ranks[rank] = ranks.get(rank, "") + f.read()
    return Run(name, -9 if timed_out else process.returncode, output, ranks, timed_out)


def losses(run: Run) -> dict[int, float]:
    """{iteration: lm loss} of every iteration Megatron-LM's training log prints (the last pipeline stage
    logs; --log-interval 1).

    Megatron's training_log does not reset its loss sums after the first iteration a run logs
    (training.py:2593, "so normal interval stats remain accurate"): the run's second line holds the mean
    of its first two iterations, so that iteration's own loss is 2 * logged - first (to the 7 digits
    the log prints)."""
    found: dict[int, float] = {}
    for text in run.ranks.values():
        for iteration, loss in _ITERATION.findall(text):
            found[int(iteration)] = float(loss)
    if found:
        first = min(found)
        if first + 1 in found:
            found[first + 1] = 2 * found[first + 1] - found[first]
    return found


def largest_relative_difference(reference: dict[int, float], other: dict[int, float]) -> float:
    """max |other - reference| / |reference| over `other`'s iterations; inf when one is missing."""
    if not other or any(i not in reference for i in other):
        return float("inf")
    return max(abs(other[i] - reference[i]) / abs(reference[i]) for i in other)


@dataclasses.dataclass
class LayoutComparison:
    reference: str
    iterations: list[int]  # compared (after the resume)
    losses: dict[str, dict[int, float]]
    differences: dict[str, float]  # layout -> largest relative difference from the reference
    control: str | None
    control_difference: float | None
    runs: dict[str, Run]
    checkpoint: str  # the reference's, saved at the resume iteration
    rtol: float = LOSS_RTOL

    @property
    def failures(self) -> list[str]:
        bad = [f"{name}: exit {run.returncode}" for name, run in self.runs.items() if run.returncode != 0]
        bad += [f"{layout}: largest relative difference {d:.3g} > {self.rtol:g}"
                for layout, d in self.differences.items() if not d <= self.rtol]
        if self.control is not None and not self.control_difference > self.rtol:
            bad.append(f"control {self.control}: differs by {self.control_difference:.3g}, not more than {self.rtol:g}: "
                       "the comparison cannot tell layouts apart")
        return bad

    def table(self) -> str:
        names = list(self.losses)
        lines = ["iteration " + " ".join(f"{n:>22}" for n in names)]
        for i in self.iterations:
            lines.append(f"{i:9d} " + " ".join(f"{self.losses[n].get(i, float('nan')):22.9f}" for n in names))
        lines += [f"{layout}: largest relative difference from {self.reference}: {d:.3g}"
                  for layout, d in self.differences.items()]
        if self.control is not None:
            lines.append(f"{self.control}: largest relative difference {self.control_difference:.3g} (must exceed {self.rtol:g})")
        return "\n".join(lines)


def compare_layouts(out_dir: str, model_args: list[str], layouts: dict[str, list[str]] | None = None,
                    iters: int = 20, resume_at: int = 10, control: bool = True, megatron_lm: str | None = None,
                    nproc: int = 8, timeout: float = 600, rtol: float = LOSS_RTOL) -> LayoutComparison:
    """The reference run (first layout, from scratch, --save at resume_at), every other layout and the
    control resumed from its checkpoint; see the module docstring."""
    layouts = layouts or LAYOUTS
    names = list(layouts)
    reference = names[0]
    checkpoint = os.path.join(out_dir, "checkpoint")
    common = [*model_args, f"--train-iters={iters}", "--ckpt-format=torch_dist"]
    runs = {reference: torchrun(reference, [*common, *layouts[reference], *FOLD_ARGS, f"--save={checkpoint}",
                                            f"--save-interval={resume_at}"], out_dir, nproc, megatron_lm, timeout)}
    resume = [f"--load={checkpoint}", f"--ckpt-step={resume_at}"]
    for name in names[1:]:
        runs[name] = torchrun(name, [*common, *layouts[name], *FOLD_ARGS, *resume], out_dir, nproc, megatron_lm, timeout)
    control_name = None
    if control:
        control_name = f"{names[1]}-subsequence"
        runs[control_name] = torchrun(control_name, [*common, *layouts[names[1]], *CONTROL_ARGS, *resume], out_dir,
                                      nproc, megatron_lm, timeout)
    found = {name: losses(run) for name, run in runs.items()}
    compared = list(range(resume_at + 1, iters + 1))
    after = {name: {i: l for i, l in found[name].items() if i > resume_at} for name in found}
    differences = {name: largest_relative_difference(found[reference], after[name]) if len(after[name]) == len(compared)
                   else float("inf") for name in names[1:]}
    return LayoutComparison(
        reference, compared, found, differences, control_name,
        largest_relative_difference(found[reference], after[control_name]) if control_name else None, runs,
        checkpoint, rtol)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_fold.testing.pretrain_gpt_runs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the rank logs and the checkpoint")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--resume-at", type=int, default=10)
    parser.add_argument("--megatron-lm", default=None, help="Megatron-LM checkout (else $MEGATRON_LM_PATH)")
    parser.add_argument("--no-control", dest="control", action="store_false")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    parser.add_argument("--bf16-bound", dest="rtol", action="store_const", const=LOSS_RTOL_BF16, default=LOSS_RTOL,
                        help=f"compare bf16 runs within {LOSS_RTOL_BF16:g} relative (default: {LOSS_RTOL:g}, for fp32)")
    parser.add_argument("model_args", nargs="*", help="after --: model and data arguments (default: the tiny "
                        "CPU model on --mock-data)")
    args = parser.parse_args(argv)
    model_args = args.model_args or [*MODEL_ARGS, "--mock-data", "--tokenizer-type=NullTokenizer", "--vocab-size=128"]
    result = compare_layouts(args.out, model_args, iters=args.iters, resume_at=args.resume_at, control=args.control,
                             megatron_lm=args.megatron_lm, timeout=args.timeout, rtol=args.rtol)
    print(result.table())
    for run in result.runs.values():
        if run.returncode != 0:
            print(run.tail(), file=sys.stderr)
    if result.failures:
        print("FAILED:\n" + "\n".join(f"  {f}" for f in result.failures))
        return 1
    print(f"layouts agree within {result.rtol:g} over iterations {result.iterations[0]}-{result.iterations[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
