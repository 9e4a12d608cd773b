#!/usr/bin/env bash
# One prepared GPU session: correctness first, then the benchmarks. Run from the repo root on the
# lent machine (PYTHONPATH-based: no installs). Logs and new result JSON go to $OUT (or ./gpu_out).
#   bash benchmarks/gpu_session.sh                                  # everything (~8 min on an H100)
#   STEPS="gpu_check generate_bench" bash benchmarks/gpu_session.sh # a subset
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
STEPS=${STEPS:-"gpu_check kernel_tests kernels_bench train_bench realloc_bench generate_bench attention_bench gemm_bench moe_bench runtime_check"}
# runtime_check needs omegaconf, absent from the GPU image: carry its wheels in .whl/ (see the note in
# benchmarks/README.md) and they are installed to a scratch site directory here
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  EXTRA=/tmp/site
fi
export PYTHONPATH=$PWD${EXTRA:+:$EXTRA} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
touch "$OUT/.start"
step() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  echo "=== $name"; local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  grep -v -e "Warning" -e "warn(" -e "it/s]" "$OUT/$name.log" | tail -n 25
  echo "=== $name rc=$rc in $((SECONDS - t0)) s"
}
# the correctness checks (benchmarks/gpu_check.py: ~30 named checks; torch.compile, graph capture and
# Triton JIT for a dozen kernel shapes take most of its 2–3 minutes on a fresh machine)
step gpu_check 300 python benchmarks/gpu_check.py
step kernel_tests 150 python -m pytest -q -x tests/kernels -k cuda -p no:cacheprovider
step kernels_bench 150 python benchmarks/fused_kernels.py ${KERNEL_FLAGS:-}
step train_bench 200 python benchmarks/train_throughput.py ${TRAIN_FLAGS:-}
step realloc_bench 120 python benchmarks/realloc.py
# no --check: gpu_check's fastgen checks compare the same engine on the same model (GEN_FLAGS=--check adds it)
step generate_bench 240 python benchmarks/generate.py ${GEN_FLAGS:-}
step attention_bench 150 python benchmarks/decode_attention.py
step gemm_bench 90 python benchmarks/decode_gemms.py
step moe_bench 120 python benchmarks/moe.py
# not in the default STEPS (the session would pass 10 minutes): where a decode step's time goes, and
# engine settings side by side; max-autotune on its own, as it compiles for minutes
step generate_profile 300 python benchmarks/generate.py --skip-hf --no-sampled --profile --variants ${GEN_VARIANTS:-cublas,stage_prefill}
step generate_autotune 420 python benchmarks/generate.py --skip-hf --no-sampled --variants autotune
step runtime_check 240 python benchmarks/gpu_runtime_check.py
# only the results this session wrote (the device tool returns at most 8 files)
find benchmarks/results -name '*.json' -newer "$OUT/.start" -exec cp {} "$OUT/" \;
ls "$OUT"
