#!/usr/bin/env bash
# The GPU suite: one command, at most about 8 minutes on one H100 or H200.
#
#   bash bench/gpu.sh            # on a CUDA machine: JSON under docs/bench/, logs under docs/results/llm-gpu/
#   bash bench/gpu.sh --quick    # on CPU, about a minute: the same four steps at smoke size, into a scratch folder
#
# 1. step time and peak memory of LoRA, PiSSA, SRLoRA and PEFT LoRA on DeBERTa-v3-base's shape, fp32,
#    batch 32 x 128 (bench/step_time.py)                                  -> docs/bench/step_time_cuda.json
# 2. memory and step time against PEFT LoRA on a bf16 LLaMA-7B-shaped block (bench/bf16.py) -> bf16_cuda.json
# 3. the wrap time (SVDs included) of a LLaMA-7B-shaped block (bench/init_time.py)         -> init_time_cuda.json
# 4. memory and step time of SRLoRA on a 4-bit LLaMA-7B-shaped block against PEFT's QLoRA (bench/qlora.py)
#                                                                         -> docs/bench/qlora_cuda.json
# 5. the LLM suite (experiments/llm.py) at a longer budget than the CPU allows: suites.py's "llm-gpu", cut
#    off when the suite's time is spent (a run is copied to docs/results/ only when it finishes).
# --quick runs 1-4 with each script's --quick on CPU and one tiny SRLoRA run of step 5 on the installed
# SmolLM2, reading the man pages from $LLM_FAR_DIR and $LLM_ENGLISH_DIR (default: the Debian packages'
# folders), all into $GPU_SUITE_OUT (default: a new temporary folder).  PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET_S=${GPU_SUITE_BUDGET_S:-480}          # the whole suite's wall-clock budget
quick=false
for arg in "$@"; do
  case "$arg" in
    --quick) quick=true ;;
    *) echo "bench/gpu.sh: unknown argument $arg; use --quick or nothing" >&2; exit 2 ;;
  esac
done

if $quick; then
  out=${GPU_SUITE_OUT:-$(mktemp -d)}
  mkdir -p "$out"
  echo "== gpu.sh --quick: CPU smoke run into $out"
  "$PY" bench/step_time.py --quick --device=cpu --models=deberta --out="$out/step_time.json" >/dev/null
  "$PY" bench/bf16.py --quick --device=cpu --out="$out/bf16.json" >/dev/null
  "$PY" bench/init_time.py --quick --device=cpu --models=minilm --out="$out/init_time.json" >/dev/null
  "$PY" bench/qlora.py --quick --device=cpu --out="$out/qlora.json" >/dev/null 2>&1
  "$PY" experiments/llm.py --method=srlora --device=cpu --r=2 --alpha=2 --r_target=4 --max_steps=2 --warmup=1 \
    --eval_every=2 --log_every=1 --batch_size=2 --block=32 --eval_blocks=2 --erank=false \
    --far_dir="${LLM_FAR_DIR:-/usr/share/man/pl}" --english_dir="${LLM_ENGLISH_DIR:-/usr/share/man}" \
    --out_dir="$out/llm" --name=quick --overwrite --plots=false >/dev/null
  echo "== done: $(ls "$out" | tr '\n' ' ')"
  exit 0
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device; use --quick on CPU')"
echo "== 1/5 step time, DeBERTa-v3-base shape, fp32, 32 x 128"
"$PY" bench/step_time.py --device=cuda --models=deberta --out=docs/bench/step_time_cuda.json >/dev/null
echo "== 2/5 bf16 LLaMA-7B-shaped block"
"$PY" bench/bf16.py --device=cuda --out=docs/bench/bf16_cuda.json >/dev/null
echo "== 3/5 wrap time, LLaMA-7B-shaped block"
"$PY" bench/init_time.py --device=cuda --models=llama_block --out=docs/bench/init_time_cuda.json >/dev/null
echo "== 4/5 SRLoRA on a 4-bit LLaMA-7B-shaped block against QLoRA"
"$PY" bench/qlora.py --device=cuda --rounds=12 --batch=4 --seq=128 --out=docs/bench/qlora_cuda.json >/dev/null
left=$((BUDGET_S - SECONDS))
echo "== 5/5 the LLM suite, llm-gpu, within the ${left}s left"
status=0
timeout "$left" "$PY" experiments/run_results.py --suite llm-gpu || status=$?
if [ "$status" = 124 ]; then
  echo "== the suite's time ran out; the runs that finished are under docs/results/llm-gpu/"
elif [ "$status" != 0 ]; then
  exit "$status"
fi
echo "== done in ${SECONDS}s"
