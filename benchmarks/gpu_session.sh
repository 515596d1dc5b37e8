#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, most valuable first, in one run on a CUDA
# machine with no network (the device machine): each step writes its JSON/log under $OUT as soon
# as it has it, and has its own time limit, so a session cut short keeps what it measured.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh          # ~10 min on an H100/H200
#
# 1. training step, real Qwen2.5 shapes (random weights): 1.5B kd (live 7B teacher), sft,
#    kd-cached; 3B kd with 8-bit AdamW; 1.5B LoRA   -> tokens/s, MFU, peak VRAM (issues 14, 18)
# 2. the loss on CUDA: fp64 check, then bf16 at 1k/4k/8k tokens (naive, kd_loss, fused, Liger if
#    installed)                                                                 (issue 15)
# 3. HF generation, Qwen2.5-7B shapes, batch 64 and 256, 200 new tokens        (issue 14)
# 4. vLLM lifecycle + throughput when vllm is importable                        (issue 14)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/slmkd-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python}
step() {  # step NAME SECONDS CMD...: run with a limit, keep stdout+stderr, note the exit code
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" | tee -a "$OUT/steps.jsonl"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$py -c "import torch, transformers; print(torch.__version__, transformers.__version__)" > "$OUT/versions.txt" 2>&1
step train_1.5b_kd      150 $py benchmarks/train_step.py --student 1.5b --method kd --steps 8 --warmup 2 --out "$OUT/train_1.5b_kd.json"
step train_1.5b_sft      90 $py benchmarks/train_step.py --student 1.5b --method sft --steps 8 --warmup 2 --out "$OUT/train_1.5b_sft.json"
step train_1.5b_cached   90 $py benchmarks/train_step.py --student 1.5b --method kd-cached --steps 8 --warmup 2 --out "$OUT/train_1.5b_cached.json"
step train_3b_kd_8bit   180 $py benchmarks/train_step.py --student 3b --method kd --optim adamw_bnb_8bit --steps 8 --warmup 2 --out "$OUT/train_3b_kd_8bit.json"
step train_1.5b_lora     90 $py benchmarks/train_step.py --student 1.5b --method kd --lora --steps 8 --warmup 2 --out "$OUT/train_1.5b_lora.json"
step cascod_rows_3b     90 $py benchmarks/cascod_rows.py --student 3b --out "$OUT/cascod_rows_3b.json"
step kd_loss_check      120 $py benchmarks/kd_loss.py --check-only --device cuda
step kd_loss_cuda       300 $py benchmarks/kd_loss.py --device cuda --dtype bfloat16 --tokens 1024,4096,8192 --json "$OUT/kd_loss_cuda.json"
step generate_7b        240 $py benchmarks/generate.py --config qwen2.5-7b --batch-sizes 64,256 --new-tokens 200 --no-vllm
if $py -c "import vllm" 2>/dev/null; then
  step vllm_lifecycle   300 $py benchmarks/vllm_lifecycle.py --out "$OUT/vllm"
fi
echo "done: $OUT"
