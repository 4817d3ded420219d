#!/usr/bin/env bash
# The GPU work of issues 4 and 6, cut into device-tool commands that each fit
# the 10-minute limit (read /work/.library/device/README.md first). On the
# device machine, from the repository root:
#
#   bash benchmarks/gpu_session.sh build    # compile for sm_90 (a few minutes)
#   bash benchmarks/gpu_session.sh tests    # CUDA kernels vs float64 references
#   bash benchmarks/gpu_session.sh segment  # segment-mean scaling, G = 1 .. 1e5
#   bash benchmarks/gpu_session.sh dc       # per-group DC gradients, 256/class
#   bash benchmarks/gpu_session.sh step     # end-to-end DM / DC step time, cdigits-fg
#   bash benchmarks/gpu_session.sh step-one-block  # DC again, all 10 classes in one block
#                                           # (fewest passes, most memory) vs the default
#   bash benchmarks/gpu_session.sh syn-dm   # DM at ImageNet-subset scale, G = 1 .. 100
#   bash benchmarks/gpu_session.sh syn-dc   # DC at that scale, G = 1 .. 10 (the reference
#                                           # loop runs ~90 backward passes per class at G = 100)
#   bash benchmarks/gpu_session.sh syn-dc-many  # DC at that scale, G = 20, 50, 100, without
#                                           # the loop rows (--skip-loop)
#
# Everything it writes goes to $OUT (what the device tool brings back; at
# most 8 files), or to /tmp/fastfair_gpu when OUT is unset. Build outputs stay
# on a warm machine between calls, so `build` is needed once per machine.
set -euo pipefail
out="${OUT:-/tmp/fastfair_gpu}"
mkdir -p "$out"
stage="${1:-}"

case "$stage" in
  build)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv >"$out/gpu.txt"
    MAX_JOBS="${MAX_JOBS:-16}" FASTFAIR_CUDA=1 pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
      || { tail -40 "$out/build.log"; exit 1; }
    python -c "import fastfair.ops as o, torch; print(o.backend(), torch.__version__, torch.cuda.get_device_name())" \
      | tee -a "$out/gpu.txt"
    ;;
  tests)
    # -rs lists the skips: on a GPU no CUDA test may be skipped.
    python -m pytest -q -rs -p no:cacheprovider tests/test_ops.py tests/test_pergroup.py tests/test_chunking.py \
      tests/test_fair_dm_loss.py tests/test_dc_objectives.py tests/test_dc_blocks.py 2>&1 | tee "$out/tests_cuda.log" | tail -30
    ;;
  segment)
    python -m fastfair.bench.segment --device cuda --json "$out/segment_ops_cuda.json"
    ;;
  dc)
    python -m fastfair.bench.dc_step --device cuda --json "$out/dc_step_cuda.json"
    ;;
  step)
    python -m fastfair.bench.step_time --device cuda --dataset cdigits-fg --json "$out/step_time_cuda_cdigits.json"
    ;;
  step-one-block)
    # DC matches max(1, C // G) classes per block by default (memory O(C + G));
    # on a GPU the extra, smaller passes may cost launches: measure both.
    python -m fastfair.bench.step_time --device cuda --dataset cdigits-fg --methods dc --dc-block-classes 10 \
      --json "$out/step_time_cuda_cdigits_dc_one_block.json"
    ;;
  syn-dm|syn-dc)
    # 25,600 real images at 64 px: the driver's automatic chunk (1365 rows
    # per pass on a GPU) keeps the real side near 5-8 GB; one method per
    # command to stay under the device tool's 10-minute limit.
    method="${stage#syn-}"
    groups=$([ "$method" = dm ] && echo 1,2,5,10,20,50,100 || echo 1,2,5,10)
    python -m fastfair.bench.step_time --device cuda --dataset synthetic --methods "$method" --groups "$groups" \
      --json "$out/step_time_cuda_synthetic_$method.json"
    ;;
  syn-dc-many)
    python -m fastfair.bench.step_time --device cuda --dataset synthetic --methods dc --groups 20,50,100 \
      --skip-loop --json "$out/step_time_cuda_synthetic_dc_many.json"
    ;;
  *)
    sed -n '2,21p' "$0"
    exit 2
    ;;
esac
