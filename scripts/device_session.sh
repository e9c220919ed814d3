#!/bin/bash
# One phase of the GPU work on the lent machine, each phase one device call (< 10 min), results under $OUT.
#
# Before the first call, here:  bash ../shared/device/pack_baselines.sh .devbundle
#                               echo /.devbundle/ >> .git/info/exclude
# Device calls (carry [".devbundle"]):   bash scripts/device_session.sh tests     (GPU tests + launch profile)
#                                        bash scripts/device_session.sh md        (MD steps vs the anchors)
#                                        bash scripts/device_session.sh kernels   (conv and node kernels)
# Every step runs under its own time limit and the next runs even if one fails; each writes a log in $OUT.
set -uo pipefail
phase=${1:?usage: device_session.sh tests|md|kernels}
repo=$(pwd)
out=${OUT:-$repo/out}
mkdir -p "$out"
[ -f .devbundle/unpack.sh ] && source .devbundle/unpack.sh
# The editable install's package_dir mapping does not work offline there: put the package together in /tmp.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/fastmlip
cp -r fastmlip/* /tmp/pkg/fastmlip/ && cp -r kernels /tmp/pkg/fastmlip/kernels && cp -r patches /tmp/pkg/fastmlip/patches
export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-} PYTHONUNBUFFERED=1 FASTMLIP_CACHE=/tmp/fastmlip-cache

step() {  # step NAME SECONDS COMMAND...: run from /tmp (so the checkout's fastmlip/ does not shadow /tmp/pkg)
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  (cd /tmp && timeout "$limit" "$@") > "$out/$name.log" 2>&1
  echo "    exit $? after $SECONDS s in total; last lines:"
  tail -n 25 "$out/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case "$phase" in
  tests)
    step gpu_tests 330 python3 -m pytest -q -m gpu -x -p no:cacheprovider "$repo/tests"
    step profile_md 200 python3 "$repo/scripts/profile_md.py" --cases sevenn:Si:3,mace-medium:Cu:3 --steps 5 \
      --out "$out"
    ;;
  md)
    step bench_md 560 python3 "$repo/scripts/bench_md.py" --steps 8 --warmup 2 --models sevenn,mace-medium,mace-large \
      --backends fastmlip,fastmlip-eager,cueq,oeq --no-sweep --out "$out/bench_md"
    ;;
  kernels)
    step bench_node_kernels 250 python3 "$repo/scripts/bench_node_kernels.py" --dtypes float32 --nodes 4000 \
      --out "$out"
    step bench_kernels 300 python3 "$repo/scripts/bench_kernels.py" --dtypes float32 \
      --impls fastmlip,cueq-ir_mul,oeq-det --precompile 14 --out "$out"
    ;;
  *)
    echo "unknown phase $phase" >&2
    exit 2
    ;;
esac
ls -la "$out"
