#!/usr/bin/env bash
# The GPU session, prepared: CUDA-only tests, then the training benchmark (this project and transformers +
# peft) and the decode benchmark, every table and a log written to OUT_DIR.
#
#   bash bench/gpu_check.sh OUT_DIR                                     # on the GPU machine (python3 preinstalled)
#   PY=.venv/bin/python bash bench/gpu_check.sh OUT_DIR --cpu-dry-run   # the same stages, tiny sizes, on a CPU
#                                                                       # (--quick is the same)
#
# The benchmarks run as modules (`$PY -m bench.bench`) from the repository root, which the script changes to, so
# the project's packages import with no PYTHONPATH. Needs no network and no pip: torch, transformers and peft are
# already there. Each stage runs under its own time limit inside one overall budget (GPU_CHECK_BUDGET_S, default
# 470 s: under 8 minutes), so a hang costs one stage, not the session; a stage that cannot get
# GPU_CHECK_MIN_STAGE_S (default 45 s) is skipped and says so. The benchmark rewrites its results after every
# run, so a stage cut short keeps what it measured. Results in OUT_DIR, five files at most (the device tool
# brings back no more than 8): <device>-<date>.md/.json (all stages combined), stages.tsv (stage, exit status,
# seconds), gpu_check.log (everything printed), and parts.tar.gz: each stage's own .md/.json and the profile,
# re-packed after every stage so a run cut short still brings back what it measured.
#
# Stages (GPU_CHECK_STAGES, comma-separated; default env,tests,attention,train,profile,decode,compile) and
# their expected time on one H200 (transformers + peft eager does 128 steps x 4096 tokens in ~13 s; a
# torch.compile warm-up takes 15 s per decoder layer graph, 60-90 s for a whole model):
#   env           nvidia-smi, versions                                                            ~5-15 s
#   tests         pytest -m cuda (bf16 fast paths against the reference path)                     ~45 s
#   attention     bench.attention_check: each SDPA kernel at new and repeated sequence lengths     ~10 s
#   train         this project: W1 at ranks 4/16/64/256, W2 padded and packed at rank 64, and with
#                 --compile on W1 at rank 64; transformers + peft eager on W1 and W2 (pad-to-longest)
#                 at rank 64, and under torch.compile on W1; 128 steps each                        ~320 s
#   this          the same for this project alone, plus PyTorch's own attention-kernel order on W1  ~150 s
#   cudagraphs    W1 rank 64 with the whole model compiled in reduce-overhead mode (CUDA graphs)   ~90 s
#   profile       bench.profile_step: where a W1 rank-64 step's time goes (systems:
#                 GPU_CHECK_PROFILE_SYSTEMS, default '--systems this,hf-eager')                   ~30-50 s
#   decode        bench.decode_bench --full (random TinyLlama checkpoint, batch 1 and 16)          ~60-90 s
#   whole         W1 rank 64 with the whole model compiled (default mode)                          ~80 s
#   compile       W2 under torch.compile, this project and transformers + peft (pad-to-longest
#                 recompiles for new lengths): whatever time is left                               rest
#   combine       one table of every benchmark stage that ran                                      ~5 s
# A stage gets what remains of the budget, minus 20 s kept for combine, and is skipped when that is under
# GPU_CHECK_MIN_STAGE_S. A run that takes its baselines from an earlier `train` stage spends its budget on this
# project alone, for example
#   GPU_CHECK_STAGES=env,tests,attention,this,cudagraphs,profile,whole \
#   GPU_CHECK_PROFILE_SYSTEMS="--systems this,this-compile" GPU_CHECK_BUDGET_S=380
set -u
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--cpu-dry-run]}
MODE=${2:-gpu}
PY=${PY:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
MIN_STAGE=${GPU_CHECK_MIN_STAGE_S:-45}
STAGES=${GPU_CHECK_STAGES:-env,tests,attention,train,profile,decode,compile}
PROFILE_SYSTEMS=${GPU_CHECK_PROFILE_SYSTEMS:---systems this,hf-eager}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
WORK=$(mktemp -d)  # per-stage results; packed into OUT/parts.tar.gz after each stage
LOG="$OUT/gpu_check.log"
: > "$LOG"
printf 'stage\texit\tseconds\n' > "$OUT/stages.tsv"
T0=$(date +%s)

if [ "$MODE" = "--cpu-dry-run" ] || [ "$MODE" = "--quick" ]; then
  # Every stage's code path, with tiny sizes, on the CPU; the CUDA tests run on the CPU in bf16.
  export GPU_TESTS_ON_CPU=1
  DEV=(--device cpu --shape tiny --steps 3 --warmup-steps 1)
  PROFILE=(--device cpu --shape tiny --skip 2 --profile-steps 1)
  DECODE_ARGS="--batches 1,2 --prompt-len 16 --new-tokens 4 --repeats 1"
  BUDGET=${GPU_CHECK_BUDGET_S:-900}
elif [ "$MODE" = "gpu" ]; then
  DEV=(--device cuda --shape full --steps 128)
  PROFILE=(--device cuda --shape full --skip 5 --profile-steps 3)
  DECODE_ARGS="--full"
  if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check.sh: $PY sees no CUDA device (torch.cuda.is_available() is False); nothing run." \
         "On a CPU, use --cpu-dry-run." | tee -a "$LOG" >&2
    exit 3
  fi
else
  echo "unknown mode $MODE (expected nothing, --cpu-dry-run or --quick)" >&2
  exit 2
fi

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "$*" | tee -a "$LOG"; }

# stage NAME LIMIT_S OK_CODES CMD...: run CMD under min(LIMIT_S, what is left of the budget minus RESERVE).
RESERVE=20
stage() {
  local name=$1 limit=$2 ok=$3
  shift 3
  case ",$STAGES," in *",$name,"*) ;; *) [ "$name" != combine ] && return 0 ;; esac
  local avail=$(( $(left) - RESERVE ))
  [ "$limit" -gt "$avail" ] && limit=$avail
  if [ "$limit" -lt "$MIN_STAGE" ] && [ "$name" != combine ] && [ "$name" != env ]; then
    log "== $name: skipped, only ${avail}s of the ${BUDGET}s budget left"
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/stages.tsv"
    return 0
  fi
  log "== $name (limit ${limit}s, $(( $(date +%s) - T0 ))s into the budget): $*"
  local start=$(date +%s) rc
  if command -v timeout >/dev/null; then
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  else
    "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  fi
  local took=$(( $(date +%s) - start ))
  case " $ok " in *" $rc "*) status=ok ;; *) status=FAILED ;; esac
  [ "$rc" = 124 ] && status="TIMED OUT"
  log "== $name: exit $rc ($status) after ${took}s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >> "$OUT/stages.tsv"
  tar czf "$OUT/parts.tar.gz" -C "$WORK" .
}

stage env 30 "0" bash -c "nvidia-smi || true; nproc; free -g || true; $PY -c '
import importlib, torch
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      torch.cuda.is_available() and torch.cuda.get_device_name())
for m in (\"transformers\", \"peft\", \"safetensors\", \"sentencepiece\", \"numpy\", \"huggingface_hub\", \"pytest\"):
    try:
        print(m, getattr(importlib.import_module(m), \"__version__\", \"?\"))
    except ImportError as e:
        print(m, \"MISSING:\", e)
'"
# Exit 5 (no test selected: a tree without CUDA-only tests) is not a failure.
stage tests 150 "0 5" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
stage attention 60 "0" "$PY" -m bench.attention_check --out "$WORK/attention"
# The headline comparison (W1 rank 64: this project eager and compiled vs transformers + peft eager and
# compiled) is all in this stage, so it cannot be starved by a later one.
stage train 380 "0" "$PY" -m bench.bench "${DEV[@]}" --ranks 4,16,64,256 --focus-rank 64 \
  --workloads W1,W2-padded,W2-packed --systems this,this-compile,hf-eager,hf-compile --hf-workloads W1,W2-padded \
  --this-compile-workloads W1 --hf-compile-workloads W1 --no-decode --out-dir "$WORK" --name train
# This project alone, for a run whose baselines come from an earlier `train` stage: the rank table, W2,
# --compile, and PyTorch's own attention-kernel order instead of this project's (flash first).
stage this 240 "0" "$PY" -m bench.bench "${DEV[@]}" --ranks 4,16,64,256 --focus-rank 64 \
  --workloads W1,W2-padded,W2-packed --systems this,this-compile --this-compile-workloads W1 \
  --variant "cudnn:sdpa_backends=default" --variant-workloads W1 --no-decode --out-dir "$WORK" --name this
stage cudagraphs 180 "0" "$PY" -m bench.bench "${DEV[@]}" --ranks "" --focus-rank 64 --workloads W1 --systems this \
  --variant "whole-cudagraphs:compile=true;compile_scope=model;compile_mode=reduce-overhead" \
  --no-decode --out-dir "$WORK" --name cudagraphs
stage profile 90 "0" "$PY" -m bench.profile_step "${PROFILE[@]}" --rank 64 $PROFILE_SYSTEMS --out "$WORK/profile"
stage decode 100 "0" "$PY" -m bench.bench "${DEV[@]}" --workloads "" --decode --decode-args "$DECODE_ARGS" \
  --out-dir "$WORK" --name decode
stage whole 180 "0" "$PY" -m bench.bench "${DEV[@]}" --ranks "" --focus-rank 64 --workloads W1 --systems this \
  --variant "whole:compile=true;compile_scope=model" --no-decode --out-dir "$WORK" --name whole
stage compile 400 "0" "$PY" -m bench.bench "${DEV[@]}" --focus-rank 64 --workloads W2-padded \
  --systems this-compile,hf-compile --this-compile-workloads W2-padded --hf-compile-workloads W2-padded \
  --no-decode --out-dir "$WORK" --name compile
RESERVE=0
parts=()
for s in train this cudagraphs whole compile decode; do [ -f "$WORK/$s.json" ] && parts+=("$WORK/$s.json"); done
if [ ${#parts[@]} -gt 0 ]; then
  # Named as a single run's results are: <device>-<date>, from the first part.
  name=$("$PY" -c 'import json, sys; from bench.bench import device_slug
d = json.load(open(sys.argv[1])); print(device_slug(d["device"]) + "-" + d["date"])' "${parts[0]}")
  stage combine 60 "0" "$PY" -m bench.bench --combine "${parts[@]}" --out-dir "$OUT" --name "$name"
fi
log "== done in $(( $(date +%s) - T0 ))s; stages:"
column -t "$OUT/stages.tsv" 2>/dev/null | tee -a "$LOG" || cat "$OUT/stages.tsv" | tee -a "$LOG"
