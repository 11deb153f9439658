#!/usr/bin/env bash
# The GPU session, prepared: CUDA-only tests, the training benchmark (this project, and transformers + peft in
# the configurations a transformers user would pick, in the same process on the same workloads), the bf16
# loss-trajectory check and a profile, every table and a log written to OUT_DIR.
#
#   bash bench/gpu_check.sh OUT_DIR                                     # on the GPU machine (python3 preinstalled)
#   PY=.venv/bin/python bash bench/gpu_check.sh OUT_DIR --cpu-dry-run   # the same stages, tiny sizes, on a CPU
#                                                                       # (--quick is the same)
#
# The benchmarks run as modules (`$PY -m bench.bench`) from the repository root, which the script changes to, so
# the project's packages import with no PYTHONPATH. Needs no network: torch, transformers, peft and triton are
# already there, and Liger-Kernel (pure Python) is installed from the wheel in bench/wheels into a folder of
# this run's own, put on PYTHONPATH for every stage; if that fails it is logged, and hf-liger's runs are recorded
# as failed with the reason. Each stage runs under its own time limit inside one overall budget
# (GPU_CHECK_BUDGET_S, default 540 s: 9 minutes, which with the machine's 2-3 minute start leaves room in a
# 15-minute session), so a hang costs one stage, not the session; a stage that cannot get GPU_CHECK_MIN_STAGE_S
# (default 45 s) is skipped and says so. The benchmark rewrites its results after every run, so a stage cut
# short keeps what it measured. Results in OUT_DIR, five files at most (the device tool brings back no more
# than 8): <device>-<date>.md/.json (all benchmark stages combined), stages.tsv (stage, exit status, seconds),
# gpu_check.log (everything printed), and parts.tar.gz: each stage's own .md/.json, the trajectory and the
# profile, re-packed after every stage so a run cut short still brings back what it measured.
#
# Stages (GPU_CHECK_STAGES, comma-separated; default env,fastpaths,familypaths,tests,train,dpo,qlora,shapes,plancheck,fsdp,trajectory,profile)
# and their expected time on one H200. What the estimates rest on: an eager TinyLlama-shape run of 128 W1 steps takes ~10 s plus
# ~1 s to build; transformers + peft eager pad-to-longest W2 ~0.35 s a step; a whole-model torch.compile
# warm-up 60-90 s (transformers + peft: 70 s), per-layer compile ~13 s.
#   env           nvidia-smi, versions                                                            ~5-15 s
#   fastpaths     bench.fast_path_check: varlen, fused MLP, grouped k/v in place against their plain
#                 paths on one TinyLlama-shaped layer (what train.py checks at start-up)            ~10 s
#   familypaths   the same for Gemma 2/3, Phi-3 and Qwen3 shapes: the first and first sliding layer
#                 (flash/varlen window_size), Gemma 2's FlexAttention softcap against the plain one ~40 s
#   tests         pytest -m cuda (bf16 fast paths against the reference path; Liger-Kernel on
#                 packed rows against plain transformers)                                         ~45 s
#   train         one process, rank 64 unless said, steps in brackets (GPU_CHECK_RUN_STEPS):
#                 this project: W1 at ranks 4/16/64/256 [128]                                     ~47 s
#                   W2-padded, W2-packed [128]; W2-packed-2048, W2-packed-4096 [32]                ~50 s
#                   --compile on W1 [32] (its warm-up is a target)                                ~18 s
#                   plain (no fused LoRA MLP, no varlen attention) on W1 and W2-packed [32]        ~14 s
#                 transformers + peft: hf-eager on W1 [64], W2-padded [32], W2-packed [64]         ~40 s
#                   hf-compile on W1 [64] and W2-packed [32] (a compile each)                    ~140 s
#                   hf-liger on W1 [64], W2-padded [32], W2-packed [64]                           ~47 s
#                 process start, data, matmul peak                                                ~15 s
#                 (hf-compile on pad-to-longest W2 would recompile for new lengths: left out)     ~370 s
#   dpo           bench.preference_bench: a DPO step, this project against trl's DPOTrainer, TinyLlama's shape
#                 with random weights, 8 pairs a step, 2 warm-up and 8 timed steps, each system in its own
#                 process (the 1.1B model made and saved first, in fp32): tokens/s and peak GiB   ~90-150 s
#   qlora         W1 rank 64 [48 steps each]: bf16 base (plain `this`), + gradient checkpointing, NF4, NF4 +
#                 checkpointing, NF4 + double quant + checkpointing, DoRA, QDoRA: tokens/s, peak GiB  ~60-90 s
#   shapes        bench.shape_bench: Llama-3.2-1B-shaped (bf16, NF4, NF4 + checkpointing) and Llama-2-7B-shaped
#                 (bf16 + checkpointing, NF4 + checkpointing, + double quant), micro-batch 4 x 1024, 12
#                 steps each, random weights: tokens/s and peak GiB                                 ~60-100 s
#   plancheck     bench.plan_check: the memory plan beside the measured peak, 4 steps each of the defaults
#                 (fused MLP), the plain MLP, NF4, NF4 + checkpointing, W1 rank 64               ~30-40 s
#   fsdp          W1 and W2-packed rank 64 [48 steps each], plain and --fsdp on one process (NCCL, bf16
#                 over sharded parameters): tokens/s and peak GiB side by side                    ~30-45 s
#   trajectory    bench.trajectory: 100 steps of W2, this project vs transformers + peft (twice)  ~70 s
#   profile       bench.profile_step: where a W1 rank-64 step's time goes (systems:
#                 GPU_CHECK_PROFILE_SYSTEMS, default '--systems this')                            ~30 s
#   combine       one table of every benchmark stage that ran                                      ~5 s
# Not in the default list (each adds its time; choose with GPU_CHECK_STAGES):
#   attention     bench.attention_check: each SDPA kernel at new and repeated sequence lengths     ~10 s
#   this          this project alone: the rank table, W2, --compile, PyTorch's own attention order ~150 s
#   cudagraphs    W1 rank 64 with the whole model compiled in reduce-overhead mode (CUDA graphs)   ~90 s
#   decode        bench.decode_bench --full (random TinyLlama checkpoint, batch 1 and 16)          ~60-90 s
#   whole         W1 rank 64 with the whole model compiled (default mode)                          ~80 s
#   compile       W2-padded under torch.compile, this project and transformers + peft             rest
#   stepab        bench.step_ab: `make bench`'s W1 and W2-packed at rank 64 [64 steps], this tree against
#                 the tree in GPU_CHECK_BASE (git archive COMMIT | tar -x -C DIR, brought along in
#                 the working tree), ABBA: ms a step, this / base                                  ~120 s
#   flexshapes    bench.flex_shapes: Gemma 2's softcapped attention over padded batches of 6 lengths
#                 and 2 batch sizes, train then eval, twice: FlexAttention as this project compiles it
#                 (power-of-two lengths), dynamic (as transformers compiles it), the plain path, and
#                 per whole-block length (torch's limit of 8): compiles, seconds, peak GiB         ~60-200 s
# A stage gets what remains of the budget, minus 20 s kept for combine, and is skipped when that is under
# GPU_CHECK_MIN_STAGE_S. For example, this project's own compiled configurations after a default session:
#   GPU_CHECK_STAGES=env,this,cudagraphs,whole GPU_CHECK_BUDGET_S=380
# The default list overruns the budget when every stage takes its estimate: the stages at the end are skipped
# and say so. QLoRA, DoRA and the other model shapes first (issues 15 and 16's measurements):
#   GPU_CHECK_STAGES=env,qlora,shapes,train
# The model families' GPU checks (issue 29): their fast paths, the CUDA tests (FlexAttention's gradients among
# them), how to compile FlexAttention, and the TinyLlama step against the tree before the families (7f7c155):
#   mkdir ab-7f7c155 && git archive 7f7c155 | tar -x -C ab-7f7c155   # on this machine, before the run
#   GPU_CHECK_STAGES=env,familypaths,tests,stepab,flexshapes GPU_CHECK_BASE=ab-7f7c155 GPU_CHECK_BUDGET_S=570 \
#     bash bench/gpu_check.sh OUT
set -u
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--cpu-dry-run]}
MODE=${2:-gpu}
PY=${PY:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
MIN_STAGE=${GPU_CHECK_MIN_STAGE_S:-45}
STAGES=${GPU_CHECK_STAGES:-env,fastpaths,familypaths,tests,train,dpo,qlora,shapes,plancheck,fsdp,trajectory,profile}
PROFILE_SYSTEMS=${GPU_CHECK_PROFILE_SYSTEMS:---systems this}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
WORK=$(mktemp -d)  # per-stage results; packed into OUT/parts.tar.gz after each stage
SCRATCH=$(mktemp -d)  # models and runs a stage makes, kept out of the results
LOG="$OUT/gpu_check.log"
: > "$LOG"
printf 'stage\texit\tseconds\n' > "$OUT/stages.tsv"
T0=$(date +%s)

if [ "$MODE" = "--cpu-dry-run" ] || [ "$MODE" = "--quick" ]; then
  # Every stage's code path, with tiny sizes, on the CPU; the CUDA tests run on the CPU in bf16. hf-liger is
  # skipped by the benchmark with a note (Triton needs CUDA); one shorter run keeps --run-steps exercised.
  export GPU_TESTS_ON_CPU=1
  DEV=(--device cpu --shape tiny --steps 3 --warmup-steps 1)
  FAST=(--device cpu --shape tiny --fused-mlp --varlen)  # a CPU picks no fast path by itself: check them all
  FAMILY_SHAPES=""  # their vocabularies alone are gigabytes in float32: GPU only
  RUN_STEPS=${GPU_CHECK_RUN_STEPS:-W2-packed-4096=2}
  PROFILE=(--device cpu --shape tiny --skip 2 --profile-steps 1)
  TRAJECTORY=(--steps 6)
  QLORA_STEPS=${GPU_CHECK_QLORA_STEPS:-this*=3}
  SHAPES=(--device cpu --tiny --steps 2 --warmup-steps 1 --max-len 64)
  PLANCHECK=(--device cpu --shape tiny --steps 2)
  DECODE_ARGS="--batches 1,2 --prompt-len 16 --new-tokens 4 --repeats 1"
  DPO=(--device cpu --width 64 --mlp 176 --layers 1 --warmup 1 --steps 1 --repeats 1)
  FLEXSHAPES=(--device cpu --lengths 40,300 --batches 2 --modes flex,plain)
  STEPAB=(--device cpu --shape tiny --ranks 4 --focus-rank 4 --workloads W1 --systems this --steps 3 --no-decode)
  BUDGET=${GPU_CHECK_BUDGET_S:-900}
elif [ "$MODE" = "gpu" ]; then
  DEV=(--device cuda --shape full --steps 128)
  FAST=(--device cuda)
  FAMILY_SHAPES="gemma-2-2b gemma-3-1b phi-3-mini qwen3-0.6b"
  # Fewer steps where a run's cost is mostly its warm-up (compiles), or where 32-64 steps already give a steady
  # rate: the budget fits every configuration once rather than a few at full length.
  RUN_STEPS=${GPU_CHECK_RUN_STEPS:-W2-packed-2048=32,W2-packed-4096=32,this[plain]=32,this-compile=32,hf-*=64,hf-*:W2-padded=32,hf-compile:W2-packed=32}
  PROFILE=(--device cuda --shape full --skip 5 --profile-steps 3)
  TRAJECTORY=()
  QLORA_STEPS=${GPU_CHECK_QLORA_STEPS:-this*=48}
  SHAPES=(--device cuda)
  PLANCHECK=(--device cuda --shape full --steps 4)
  DECODE_ARGS="--full"
  DPO=(--device cuda --width 2048 --mlp 5632 --layers 22 --batch-size 8 --warmup 2 --steps 8 --repeats 1)
  FLEXSHAPES=(--device cuda)
  STEPAB=(--device cuda --shape full --ranks 64 --focus-rank 64 --workloads W1,W2-packed --systems this --steps 64
          --no-decode)
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
  tar czf "$OUT/parts.tar.gz" -C "$WORK" --exclude=./pylib .
}

# Liger-Kernel for hf-liger and its CUDA test: the wheel in the tree (no index, no dependencies: triton and
# torch are there), into this run's own folder, first on PYTHONPATH for every stage below.
LIB="$WORK/pylib"
if "$PY" -m pip install --quiet --no-deps --no-index --target "$LIB" bench/wheels/*.whl >> "$LOG" 2>&1; then
  log "== Liger-Kernel installed into $LIB: $(cd "$LIB" && ls -d liger_kernel-*.dist-info)"
else
  log "== Liger-Kernel could not be installed (pip exit $?, see above); hf-liger's runs will record the error"
fi
export PYTHONPATH="$LIB${PYTHONPATH:+:$PYTHONPATH}"

stage env 30 "0" bash -c "nvidia-smi || true; nproc; free -g || true; $PY -c '
import importlib, torch
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      torch.cuda.is_available() and torch.cuda.get_device_name())
for m in (\"transformers\", \"peft\", \"triton\", \"liger_kernel\", \"flash_attn\", \"safetensors\", \"sentencepiece\",
          \"numpy\", \"huggingface_hub\", \"pytest\"):
    try:
        print(m, getattr(importlib.import_module(m), \"__version__\", \"?\"))
    except Exception as e:
        print(m, \"MISSING:\", type(e).__name__, e)
'"
# The runtime plan's fast paths, each once beside its plain path, before anything is timed.
stage fastpaths 60 "0" "$PY" -m bench.fast_path_check "${FAST[@]}"
stage familypaths 120 "0" bash -c "for s in $FAMILY_SHAPES; do $PY -m bench.fast_path_check --device cuda --flex-softcap --shape \$s \
  || exit 1; done"
# Exit 5 (no test selected: a tree without CUDA-only tests) is not a failure.
stage tests 120 "0 5" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
stage attention 60 "0" "$PY" -m bench.attention_check --out "$WORK/attention"
# Every configuration compared is in this one process, on the same workloads (see the header for what and how
# long); hf-liger runs after every other transformers run, as bench.bench plans it.
stage train 420 "0" "$PY" -m bench.bench "${DEV[@]}" --ranks 4,16,64,256 --focus-rank 64 \
  --workloads W1,W2-padded,W2-packed,W2-packed-2048,W2-packed-4096 \
  --systems this,this-compile,hf-eager,hf-compile,hf-liger --this-compile-workloads W1 \
  --hf-workloads W1,W2-padded,W2-packed --hf-compile-workloads W1,W2-packed \
  --variant "plain:fused_mlp=false;varlen=false" --variant-workloads W1,W2-packed \
  --run-steps "$RUN_STEPS" --no-decode --out-dir "$WORK" --name train
# DPO against trl's DPOTrainer: the same model, pairs and batch, each system in a process of its own.
stage dpo 200 "0" "$PY" -m bench.preference_bench "${DPO[@]}" --folder "$SCRATCH/dpo" --out "$WORK/dpo.md"
stage qlora 150 "0" "$PY" -m bench.bench "${DEV[@]}" --ranks 64 --focus-rank 64 --workloads W1 --systems this \
  --variant "gc:grad_checkpointing=true" --variant "nf4:quantize=nf4" \
  --variant "nf4-gc:quantize=nf4;grad_checkpointing=true" \
  --variant "nf4-dq-gc:quantize=nf4;double_quant=true;grad_checkpointing=true" \
  --variant "dora:dora=true" --variant "qdora:quantize=nf4;dora=true" --variant-workloads W1 \
  --run-steps "$QLORA_STEPS" --no-decode --out-dir "$WORK" --name qlora
stage shapes 150 "0" "$PY" -m bench.shape_bench "${SHAPES[@]}" --out "$WORK/shapes"
# The memory plan (training.plan) beside the measured peak for the current defaults, the fused MLP and NF4.
stage plancheck 120 "0" "$PY" -m bench.plan_check "${PLANCHECK[@]}" --out "$WORK/plan_check"
# --fsdp on one process: NCCL, bf16 autocast over FSDP2's parameters, and its tokens/s beside the plain path's.
stage fsdp 90 "0" "$PY" -m bench.bench "${DEV[@]}" --ranks 64 --focus-rank 64 --workloads W1,W2-packed \
  --systems this --variant "fsdp:fsdp=full" --variant-workloads W1,W2-packed --run-steps "$QLORA_STEPS" \
  --no-decode --out-dir "$WORK" --name fsdp
stage trajectory 120 "0" "$PY" -m bench.trajectory ${TRAJECTORY[@]+"${TRAJECTORY[@]}"} --out "$WORK/trajectory"
stage profile 90 "0" "$PY" -m bench.profile_step "${PROFILE[@]}" --rank 64 $PROFILE_SYSTEMS --out "$WORK/profile"
# This project alone, for a session whose baselines come from an earlier `train` stage: the rank table, W2,
# --compile, and PyTorch's own attention-kernel order instead of this project's (flash first).
stage this 240 "0" "$PY" -m bench.bench "${DEV[@]}" --ranks 4,16,64,256 --focus-rank 64 \
  --workloads W1,W2-padded,W2-packed --systems this,this-compile --this-compile-workloads W1 \
  --variant "cudnn:sdpa_backends=default" --variant-workloads W1 --no-decode --out-dir "$WORK" --name this
stage cudagraphs 180 "0" "$PY" -m bench.bench "${DEV[@]}" --ranks "" --focus-rank 64 --workloads W1 --systems this \
  --variant "whole-cudagraphs:compile=true;compile_scope=model;compile_mode=reduce-overhead" \
  --no-decode --out-dir "$WORK" --name cudagraphs
stage decode 100 "0" "$PY" -m bench.bench "${DEV[@]}" --workloads "" --decode --decode-args "$DECODE_ARGS" \
  --out-dir "$WORK" --name decode
stage whole 180 "0" "$PY" -m bench.bench "${DEV[@]}" --ranks "" --focus-rank 64 --workloads W1 --systems this \
  --variant "whole:compile=true;compile_scope=model" --no-decode --out-dir "$WORK" --name whole
stage compile 400 "0" "$PY" -m bench.bench "${DEV[@]}" --focus-rank 64 --workloads W2-padded \
  --systems this-compile,hf-compile --this-compile-workloads W2-padded --hf-compile-workloads W2-padded \
  --no-decode --out-dir "$WORK" --name compile
stage stepab 200 "0" "$PY" -m bench.step_ab --base "${GPU_CHECK_BASE:-ab-base}" --out "$WORK/step_ab" -- "${STEPAB[@]}"
stage flexshapes 240 "0" "$PY" -m bench.flex_shapes "${FLEXSHAPES[@]}" --out "$WORK/flex_shapes"
RESERVE=0
parts=()
for s in train qlora this cudagraphs whole compile decode; do [ -f "$WORK/$s.json" ] && parts+=("$WORK/$s.json"); done
if [ ${#parts[@]} -gt 0 ]; then
  # Named as a single run's results are: <device>-<date>, from the first part.
  name=$("$PY" -c 'import json, sys; from bench.bench import device_slug
d = json.load(open(sys.argv[1])); print(device_slug(d["device"]) + "-" + d["date"])' "${parts[0]}")
  stage combine 60 "0" "$PY" -m bench.bench --combine "${parts[@]}" --out-dir "$OUT" --name "$name"
fi
log "== done in $(( $(date +%s) - T0 ))s; stages:"
column -t "$OUT/stages.tsv" 2>/dev/null | tee -a "$LOG" || cat "$OUT/stages.tsv" | tee -a "$LOG"
