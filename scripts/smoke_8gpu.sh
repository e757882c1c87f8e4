#!/bin/bash
# Smoke test for one 8-GPU node: run before merging a change.
#   (a) the layer and whole-model invariance tests: the CPU tier's own tests, run with
#       MFOLD_TEST_DEVICE=cuda, which puts each of their 8 ranks on its own GPU with nccl (8 GPUs);
#   (b) Megatron-LM's pretrain_gpt.py --mock-data with the drop-in flag under three folded layouts, the
#       same comparison as the CPU tier's tests (megatron_fold.testing.pretrain_gpt_runs: one reference run
#       saves at $RESUME_AT, the others resume from it under their layouts; every logged loss up to $ITERS
#       agrees within its LOSS_RTOL, a subsequence-scope control must not);
#   (c) the whole-model step-time ratio of --moe-fold against Megatron's own alltoall dispatcher with
#       Transformer Engine (same model, same layout), and the per-layer ratio from bench_moe_layer.py.
# Exits non-zero on any failure; writes a summary to $OUT/summary.txt. With fewer GPUs it runs what fits
# and says what it skipped.
#
# Usage: MEGATRON_LM_PATH=/path/to/Megatron-LM scripts/smoke_8gpu.sh [--dry-run] [--gpus N] [--out DIR]
#   --dry-run  print what would run (no GPU needed) and the summary of planned steps
#   --gpus N   GPUs to use (default: all that nvidia-smi lists, at most 8)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
ITERS="${ITERS:-20}"
RESUME_AT="${RESUME_AT:-10}"
DRY_RUN=0
GPUS=""
OUT="${OUT:-$ROOT/smoke-$(date +%Y%m%d-%H%M%S)}"

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --gpus) GPUS="${2:?--gpus needs a number}"; shift 2 ;;
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "smoke_8gpu.sh: unknown argument '$1' (use --dry-run, --gpus N, --out DIR)" >&2; exit 2 ;;
  esac
done
if [ -z "$GPUS" ]; then
  GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
if ! [[ "$GPUS" =~ ^[0-9]+$ ]]; then
  echo "smoke_8gpu.sh: --gpus must be a whole number, got '$GPUS'" >&2
  exit 2
fi
[ "$GPUS" -gt 8 ] && GPUS=8

# The model: small enough for one node, large enough to route (8 experts, top 2, 4 layers).
MODEL=(--num-layers=4 --hidden-size=512 --num-attention-heads=8 --group-query-attention --num-query-groups=4
  --ffn-hidden-size=1024 --moe-ffn-hidden-size=512 --num-experts=8 --moe-router-topk=2 --swiglu
  --normalization=RMSNorm --position-embedding-type=rope --disable-bias-linear --untie-embeddings-and-output-weights
  --seq-length=1024 --max-position-embeddings=1024 --micro-batch-size=1 --global-batch-size=16
  --moe-router-load-balancing-type=aux_loss --moe-aux-loss-coeff=1e-2 --moe-expert-capacity-factor=1.0
  --mock-data --tokenizer-type=NullTokenizer --vocab-size=32000 --lr=1e-4 --min-lr=1e-5 --lr-decay-style=constant
  --log-interval=1 --eval-interval=1000 --eval-iters=0 --seed=1234 --make-vocab-size-divisible-by=64
  --attention-dropout=0 --hidden-dropout=0 --transformer-impl=transformer_engine
  --bf16 --moe-router-dtype=fp32)
# bf16: Transformer Engine has no fp32 attention backend under context parallelism (a CP2 layout), and
# the step times of (c) mean something only in the precision a GPU run uses; the router keeps fp32 logits.
# (b) compares bf16 runs with the bf16 bound (pretrain_gpt_runs.LOSS_RTOL_BF16), the CPU tier fp32 runs with LOSS_RTOL.
# (b)'s folded layouts are megatron_fold.testing.pretrain_gpt_runs.LAYOUTS; (c) times the first of them.
REFERENCE_LAYOUT=(--tensor-model-parallel-size=2 --sequence-parallel --expert-model-parallel-size=4 --expert-tensor-parallel-size=1)

SKIPPED=()
FAILED=()
PASSED=()

ok() {  # record a passed step (with --dry-run: a planned one)
  if [ "$DRY_RUN" -eq 1 ]; then PASSED+=("(planned) $1"); else PASSED+=("$1"); fi
}

exec 3>&1  # the terminal, for --dry-run's lines (the commands' own output goes to log files)
run() {  # run a command, or print it with --dry-run
  if [ "$DRY_RUN" -eq 1 ]; then
    { printf 'would run:'; printf ' %q' "$@"; printf '\n'; } >&3
    return 0
  fi
  "$@"
}

pretrain() {  # pretrain <log file> <Megatron-LM arguments...>
  local log="$1"; shift
  run env CUDA_DEVICE_MAX_CONNECTIONS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node=8 \
    -m megatron_fold.pretrain_gpt "$@" > "$log" 2>&1
}

mkdir -p "$OUT"
echo "smoke test: $GPUS GPU(s), output in $OUT"

# ---- (a) invariance tests -----------------------------------------------------------------------------
if [ "$GPUS" -ge 8 ]; then
  if run env MFOLD_TEST_DEVICE=cuda PYTORCH_NVML_BASED_CUDA_CHECK=1 "$PYTHON" -m pytest -q \
      "$ROOT/tests/distributed/test_fold_moe_layer.py" "$ROOT/tests/distributed/test_whole_model.py" \
      -k "matches_single_rank or layout_invariant or controls or checkpoint" > "$OUT/invariance.log" 2>&1; then
    ok "(a) layer and whole-model invariance tests on 8 GPUs (nccl)"
  else
    FAILED+=("(a) invariance tests: see $OUT/invariance.log")
  fi
else
  SKIPPED+=("(a) invariance tests: they need 8 GPUs, one per rank (the CPU tier runs them: make test)")
fi

# ---- (b) pretrain_gpt.py with the drop-in flag under three folded layouts ------------------------------
# The CPU tier's comparison (tests/megatron_lm/), same code and threshold: megatron_fold.testing.pretrain_gpt_runs
# runs the reference layout from scratch with a torch_dist checkpoint at RESUME_AT, the other layouts
# resumed from it, and a subsequence-scope control that must differ.
if [ "$GPUS" -lt 8 ]; then
  SKIPPED+=("(b) pretrain_gpt.py under three folded layouts: each layout needs 8 GPUs, $GPUS available")
  SKIPPED+=("(c) step-time ratios against Megatron's alltoall dispatcher: need 8 GPUs, $GPUS available")
elif [ -z "${MEGATRON_LM_PATH:-}" ] && [ "$DRY_RUN" -eq 0 ]; then
  FAILED+=("(b), (c): set MEGATRON_LM_PATH to a Megatron-LM checkout (tag core_v0.19.0)")
else
  if run env CUDA_DEVICE_MAX_CONNECTIONS=1 "$PYTHON" -m megatron_fold.testing.pretrain_gpt_runs --out "$OUT/layouts" \
      --iters "$ITERS" --resume-at "$RESUME_AT" --bf16-bound -- "${MODEL[@]}" > "$OUT/losses.txt" 2>&1; then
    ok "(b) pretrain_gpt.py --moe-fold: layouts and the resumed runs agree (megatron_fold.testing.pretrain_gpt_runs): $OUT/losses.txt"
  else
    FAILED+=("(b) pretrain_gpt.py --moe-fold under three folded layouts: see $OUT/losses.txt")
  fi

  # ---- (c) step time against Megatron's own alltoall dispatcher with Transformer Engine ----------------
  if pretrain "$OUT/baseline-alltoall.log" "${MODEL[@]}" --train-iters="$ITERS" "${REFERENCE_LAYOUT[@]}" \
      --moe-token-dispatcher-type=alltoall; then
    if [ "$DRY_RUN" -eq 0 ]; then
      # The --moe-fold reference run of (b): its last rank logs the iteration times.
      fold_log="$(find "$OUT/layouts/tp2-sp-ep4-etp1" -path '*/attempt_0/7/stdout.log' | head -n 1)"
      "$PYTHON" - "$fold_log" "$OUT/baseline-alltoall.log" > "$OUT/step_time.txt" <<'EOF' || true
import re, statistics, sys
def ms(log):  # median over the second half: the first iterations include warm-up
    t = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", open(log).read())]
    return statistics.median(t[len(t) // 2:]) if t else float("nan")
fold, base = ms(sys.argv[1]), ms(sys.argv[2])
print(f"whole model, {sys.argv[1]}: --moe-fold {fold:.1f} ms/iter, Megatron alltoall {base:.1f} ms/iter, ratio {fold / base:.3f}")
EOF
      cat "$OUT/step_time.txt"
    fi
    ok "(c) whole-model step time against Megatron's alltoall dispatcher: $OUT/step_time.txt"
  else
    FAILED+=("(c) baseline run with Megatron's alltoall dispatcher: see $OUT/baseline-alltoall.log")
  fi
  # bench_moe_layer.py: per-layer ratios, syncs, bytes, kernels and copies against Megatron's alltoall
  # MoELayer on 8 nccl ranks, one GPU each (the all-to-alls cross GPUs), bf16, at GPU-sized shapes.
  if run "$PYTHON" "$ROOT/scripts/bench_moe_layer.py" --device cuda --bf16 --seq 4096 --hidden 1024 --iters 20 \
      > "$OUT/layer_step_time.txt" 2>&1; then
    ok "(c) per-layer ratios on 8 GPUs (bench_moe_layer.py --device cuda --bf16): $OUT/layer_step_time.txt"
  else
    FAILED+=("(c) per-layer benchmark: see $OUT/layer_step_time.txt")
  fi
fi

{
  echo "smoke test on $GPUS GPU(s) ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  if [ "$DRY_RUN" -eq 1 ]; then echo "DRY RUN: nothing was run"; fi
  for line in "${PASSED[@]}"; do echo "PASSED  $line"; done
  for line in "${SKIPPED[@]}"; do echo "SKIPPED $line"; done
  for line in "${FAILED[@]}"; do echo "FAILED  $line"; done
} | tee "$OUT/summary.txt"
[ "${#FAILED[@]}" -eq 0 ]
