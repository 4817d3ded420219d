#!/usr/bin/env bash
# The first GPU run (issue 16), as ONE device-tool command of at most 10
# minutes (read /work/.library/device/README.md first). From the repository
# root on the device machine (H200, torch 2.11 + cu130, Python 3.12, 16 cores,
# no network):
#
#   bash benchmarks/gpu_session.sh            # everything, in priority order
#   bash benchmarks/gpu_session.sh wgrad dc   # only these stages (build first on a fresh machine)
#
# Stages, in order; each gets what is left of the 560 s budget (DEADLINE_S)
# up to its own cap, and a stage that cannot start with 20 s left is skipped:
#   build    pip install -e . for sm_90 with all 16 cores (CUDA kernels)       cap 240 s
#   tests    the CUDA parametrisations (-k cuda) of the kernel tests, -rs      cap  90 s
#   wgrad    which weight-gradient implementation (fastfair.bench.wgrad)      cap 170 s
#   error    grouped-GEMM precision vs float64 and the DC loss (wgrad_error)  cap  40 s
#   segment  segment-mean scaling, G = 1 .. 1e5 (fastfair.bench.segment)      cap  60 s
#   dc       per-group DC gradients, 256/class (fastfair.bench.dc_step)       cap  90 s
#   step     DM / DC step time on cdigits-fg (fastfair.bench.step_time)        cap  90 s
#
# $OUT gets at most 8 files (the device tool's limit): gpu.txt, session.log
# (every stage's output, the build log's tail, the test report) and one JSON
# per measurement, copied there as soon as its stage ends (a cut-off keeps
# what finished). PNGs are not sent back: redraw them here from the JSON.
set -uo pipefail
out="${OUT:-/tmp/fastfair_gpu}"
scratch="$(mktemp -d /tmp/fastfair_gpu.XXXX)"
mkdir -p "$out"
log="$out/session.log"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
start=$(date +%s)
deadline=$(( start + ${DEADLINE_S:-560} ))
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests wgrad error segment dc step)

# run_stage NAME CAP CMD...: CMD under a timeout of min(CAP, time left); its
# output into session.log; its JSON (if any) from $scratch into $OUT.
run_stage() {
  local name="$1" cap="$2"
  shift 2
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left}s left" | tee -a "$log"
    return 0
  fi
  local limit=$(( cap < left ? cap : left ))
  echo "== $name (limit ${limit}s, $(( $(date +%s) - start ))s into the session)" | tee -a "$log"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "== $name: rc $rc after $(( $(date +%s) - t0 ))s" | tee -a "$log"
  cp "$scratch"/*.json "$out"/ 2>/dev/null
  rm -f "$scratch"/*.json
  return 0
}

for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv >"$out/gpu.txt" 2>&1
      build() {
        MAX_JOBS=16 FASTFAIR_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" \
          "$py" -m pip install --no-build-isolation --no-deps -e . >"$scratch/build.log" 2>&1
        local rc=$?
        tail -25 "$scratch/build.log"
        "$py" -c "import fastfair.ops as o, torch; print('backend', o.backend(), torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
        return $rc
      }
      run_stage build 240 bash -c "$(declare -f build); py=$py scratch=$scratch; build"
      tail -3 "$log" >>"$out/gpu.txt"
      ;;
    tests)
      # Only the CUDA parametrisations (CI runs the CPU ones); -rs lists skips:
      # on a GPU none of these may be skipped.
      run_stage tests 90 "$py" -m pytest -q -rs -p no:cacheprovider -k cuda \
        tests/test_wgrad.py tests/test_pergroup.py tests/test_ops.py tests/test_chunking.py \
        tests/test_fair_dm_loss.py tests/test_dc_objectives.py tests/test_dc_blocks.py
      ;;
    wgrad)
      run_stage wgrad 170 "$py" -m fastfair.bench.wgrad --device cuda --loop-budget 8 --json "$scratch/wgrad_cuda.json"
      ;;
    error)
      run_stage error 40 "$py" -m fastfair.bench.wgrad_error --device cuda --json "$scratch/wgrad_error_cuda.json"
      ;;
    segment)
      run_stage segment 60 "$py" -m fastfair.bench.segment --device cuda --json "$scratch/segment_ops_cuda.json"
      ;;
    dc)
      run_stage dc 90 "$py" -m fastfair.bench.dc_step --device cuda --json "$scratch/dc_step_cuda.json"
      ;;
    step)
      run_stage step 90 "$py" -m fastfair.bench.step_time --device cuda --dataset cdigits-fg \
        --json "$scratch/step_time_cuda_cdigits.json"
      ;;
    *)
      awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"
      exit 2
      ;;
  esac
done
echo "== done after $(( $(date +%s) - start ))s; in $out: $(ls "$out" | tr '\n' ' ')" | tee -a "$log"
# The last lines of the reply: what each stage did.
grep '^== ' "$log"
