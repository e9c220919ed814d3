#!/bin/bash
# The GPU work on the lent machine, in phases; several phases per device call (keep a call under 10 minutes),
# results and logs under $OUT (at most 8 files come back per call).
#
# Before the first call, here:  bash ../shared/device/pack_baselines.sh .devbundle
#                               echo /.devbundle/ >> .git/info/exclude
# and for the GPU tests (carry [".devbundle", ".devcache"]), their models' kernels compiled without a GPU (~5 MB):
#   echo /.devcache/ >> .git/info/exclude
#   PYTHONPATH=<a Triton 3.6 site-packages> python scripts/compile_kernels.py --gpu-tests --cache /tmp/devcache
#   mkdir -p .devcache && tar cJf .devcache/compiled.tar.xz -C /tmp/devcache compiled
# (phases that need no cuEquivariance can carry a lighter .devlite: .devbundle/site.tar.xz and an unpack.sh
#  that extracts only it)
# Device calls (carry [".devbundle"]), e.g.:
#   bash scripts/device_session.sh gpu-tests-faces             (one half of the GPU tests; gpu-tests-kernels the other)
#   bash scripts/device_session.sh tests                       (~9 min: cold kernel compiles on a fresh machine)
#   bash scripts/device_session.sh profile md-sevenn           (~7 min)
#   bash scripts/device_session.sh md-mace node                (~9 min)
#   bash scripts/device_session.sh conv                        (~6 min)
#   bash scripts/device_session.sh speed                       (~7 min: 4000-atom steps and their profile)
#   bash scripts/device_session.sh mdloop-mace                 (~9 min: fastmlip.simulate vs FastMACE)
#   bash scripts/device_session.sh mdloop-sevenn               (~5 min)
# lammps-gpu (LAMMPS built there, then scripts/bench_lammps.py) carries [".devbundle", ".devcache", ".devlammps"]:
#   from a LAMMPS checkout (29 Aug 2024 used), `git archive HEAD cmake python src/fmt src/STUBS src/ML-IAP
#   src/ML-SNAP src/PYTHON doc/lammps.1 doc/msi2lmp.1 LICENSE README <every file directly in src/>` unpacked, then
#   tar cJf .devlammps/lammps-src.tar.xz -C <that folder> .   (3 MB; echo /.devlammps/ >> .git/info/exclude)
# Phases: radial-table-tests / radial-table / radial-table-small (radial MLPs read from tables against computed: tests,
# then MD loops profiled per FASTMLIP_RADIAL_TABLE / FASTMLIP_TABLE_GRADIENT setting at 4000 / 216 atoms), coldstart-exported (time to the first step from exported files too), knobs-wide (216-atom loop profiles with edges side by side in the aggregate, the radial-MLP forward split by columns, the backward's walk not unrolled: the slowest compile), wide-cu4000 (Cu 4000 steps under each candidate knob), cell-pairs (Cu 32000 MD steps, pairs in the graph through the cell list vs Verlet), knobs-linear (the same for the o3.Linear tiles), defaults-check (conv unroll / MLP backward rows, new against old, Cu 4000 and Si 216 loops), ncu-small (Nsight Compute counters of the 216-atom step's MLP, conv and linear kernels), knobs-small (216-atom loop profiles under conv unroll/stages and MLP rows), batch (fastmlip.evaluate vs a calculator loop), mlp-rows (MD loops at 216 atoms with 32, 64 and 128 edges per radial-MLP program), setup-profile (SevenNet-0's warm start under cProfile after the imports), profile-cu4000 (the speed phase's profile alone), conv-small
# (the convolution kernels at a 216-atom graph, CSR vs atomic), sweep / sweep-mace (largest Cu fcc per GPU),
# defaults (GPU tests under the current defaults, fused radial MLP vs e3nn matmuls), dots (tf32x3 dots and the fused radial MLP at any size vs the defaults),
# loop-profile (GPU busy and kernels per step inside fastmlip.simulate at 216 atoms; loop-profile-cu4000 at 4000;
# PROFILE_CASES=model:crystal:repeat,... narrows either), linear (o3.Linear tiles vs cuBLAS), mlp-layers (radial-MLP layers as tiles vs cuBLAS), nve-ns (the 1 ns NVE run, a slice per call), coldstart (time to the first MD step, cold and warm cache, then a warm run's slowest imports), gpu-tests (every test marked gpu, or those
# GPU_TESTS_K selects with pytest -k),
# tests (GPU tests of the models and the kernels new since the last GPU run), profile (launches and
# kernel time of a SevenNet-0 Si 216 step), md-sevenn / md-mace (MD steps vs cuEquivariance and
# OpenEquivariance), node (node kernels + radial MLP vs e3nn/cuEquivariance), conv (fused convolution).
# Every step runs under its own time limit and the next runs even if one fails.
set -uo pipefail
[ $# -gt 0 ] || { echo "usage: device_session.sh PHASE..." >&2; exit 2; }
repo=$(pwd)
out=${OUT:-$repo/out}
mkdir -p "$out"
if [ -f .devbundle/unpack.sh ]; then source .devbundle/unpack.sh; elif [ -f .devlite/unpack.sh ]; then source .devlite/unpack.sh; fi
# The editable install's package_dir mapping does not work offline there: put the package together in /tmp.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/fastmlip
cp -r fastmlip/* /tmp/pkg/fastmlip/ && cp -r kernels /tmp/pkg/fastmlip/kernels && cp -r patches /tmp/pkg/fastmlip/patches
export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-} PYTHONUNBUFFERED=1 FASTMLIP_CACHE=/tmp/fastmlip-cache
# kernels compiled without a GPU (scripts/compile_kernels.py --gpu-tests, Triton 3.6; see above), carried
if [ -f .devcache/compiled.tar.xz ]; then mkdir -p "$FASTMLIP_CACHE" && tar xJf .devcache/compiled.tar.xz -C "$FASTMLIP_CACHE"; fi

step() {  # step NAME SECONDS COMMAND...: run from /tmp (so the checkout's fastmlip/ does not shadow /tmp/pkg)
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  (cd /tmp && timeout "$limit" "$@") > "$out/$name.log" 2>&1
  echo "    exit $? after $SECONDS s in total; last lines:"
  tail -n 25 "$out/$name.log"
}

as_installed() {  # as_installed COMMAND...: run it on packages as a user's install has them, for start-up timings:
  # bytecode written, as pip writes it at install time (else every start compiles it: the machine's own torch
  # comes without any, and with PYTHONDONTWRITEBYTECODE `import torch` took 3.2 s there, every time);
  # openequivariance off the path meanwhile: sevenn and mace import it when present, and the packed copy (an
  # sdist, no prebuilt extension) JIT-builds its CUDA extension at its first import (~35 s in one process)
  local site timed="import time; t = time.perf_counter(); import torch; print('import torch', time.perf_counter() - t)"
  site=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
  python3 -c "$timed"
  python3 -m compileall -q -j 0 "$site" /tmp/baselines/site /tmp/pkg > /dev/null 2>&1
  python3 -c "$timed, '(bytecode written)'"
  mv /tmp/baselines/site/openequivariance /tmp/baselines/openequivariance.aside 2> /dev/null
  "$@"
  mv /tmp/baselines/openequivariance.aside /tmp/baselines/site/openequivariance 2> /dev/null
}

profile_knobs() {  # profile_knobs NAME VARIANT:[VAR=VALUE] ...: the 216-atom MD loops of SevenNet-0 and
  # MACE-medium-like profiled inside fastmlip.simulate once per variant, merged into $out/NAME.json
  local name=$1 spec variant
  shift
  for spec in "$@"; do
    variant=${spec%%:*}
    step "${name}_$variant" 150 env ${spec#*:} python3 "$repo/scripts/profile_loop.py" \
      --cases sevenn:Si:3,mace-medium:Si:3 --steps 100 --warmup 30 --top 8 --out "$out/$name/$variant"
  done
  python3 -c "import json, sys; json.dump({v: json.load(open(f'$out/$name/{v}/profile_loop.json')) for v in sys.argv[1:]}, open('$out/$name.json', 'w'), indent=1)" "${@%%:*}"
  rm -rf "${out:?}/$name"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for phase in "$@"; do
  case "$phase" in
    coldstart-exported)
      # time to the first MD step from the file `fastmlip convert --to exported` writes (no framework import)
      # beside the framework's own file, cold and warm (the <= 5 s warm target of the cold-start issue); one model
      # per call: COLDSTART_CASES=mace-medium for the other; COLDSTART_OPTIONS="--importtime --profile" adds where a
      # warm start's time goes
      as_installed step coldstart_exported 540 python3 "$repo/scripts/bench_cold_start.py" --exported \
        --cases "${COLDSTART_CASES:-sevenn}" ${COLDSTART_OPTIONS:-} --out "$out/cold_start_exported"
      ;;
    coldstart)
      as_installed step cold_start 400 python3 "$repo/scripts/bench_cold_start.py" ${COLDSTART_OPTIONS-"--importtime"} \
        --out "$out"
      ;;
    gpu-tests|gpu-tests-faces|gpu-tests-kernels)
      # every test marked gpu (2026-12-03: cut at 540 s after 20 of ~45 on a fresh machine: kernel compiles), or
      # one half per call: the faces and patches, or the kernels and ops; narrowed further with GPU_TESTS_K. One
      # line per test (-v), so a log cut by the time limit still names every result
      case $phase in
        gpu-tests-faces) dirs=("$repo/tests/faces" "$repo/tests/patches") ;;
        gpu-tests-kernels) dirs=("$repo/tests/kernels" "$repo/tests/ops" "$repo/tests/reference" "$repo/tests/descriptors") ;;
        *) dirs=("$repo/tests") ;;
      esac
      # does this machine take the carried kernels (.devcache)? "N from the cache" says so
      [ -f .devcache/compiled.tar.xz ] && as_installed step carried_cache 120 python3 -m fastmlip.cli warmup 7net-0 \
        --dtype float32
      step gpu_tests 540 python3 -m pytest -v -rf -p no:cacheprovider -m gpu --durations 15 \
        ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} "${dirs[@]}"
      [ -n "${GPU_TESTS_K:-}" ] || [ "$phase" = gpu-tests-faces ] || \
        step chunk_tests 120 python3 -m pytest -q -p no:cacheprovider "$repo/tests/ops/test_radial_conv.py"
      ;;
    tests)
      step gpu_tests 540 python3 -m pytest -q -p no:cacheprovider -x "$repo/tests/patches/test_gpu_models.py" \
        "$repo/tests/ops/test_radial_mlp.py" "$repo/tests/ops/test_radial_basis.py" "$repo/tests/ops/test_gate.py" \
        "$repo/tests/kernels/test_linear_triton.py" "$repo/tests/faces/test_cuda_graph.py"
      ;;
    profile)
      step profile_md 120 python3 "$repo/scripts/profile_md.py" --cases sevenn:Si:3 --steps 5 --top 15 --out "$out"
      ;;
    md-sevenn)
      step bench_md_sevenn 300 python3 "$repo/scripts/bench_md.py" --steps 8 --warmup 2 --models sevenn \
        --backends fastmlip,fastmlip-eager,cueq,oeq --no-sweep --out "$out/bench_md_sevenn"
      ;;
    md-mace)
      step bench_md_mace 380 python3 "$repo/scripts/bench_md.py" --steps 8 --warmup 2 \
        --models mace-medium,mace-large --backends fastmlip,fastmlip-eager,cueq,oeq --no-sweep \
        --out "$out/bench_md_mace"
      ;;
    node)
      step bench_node_kernels 200 python3 "$repo/scripts/bench_node_kernels.py" --dtypes float32 --nodes 4000 \
        --out "$out"
      ;;
    speed)
      # energy+forces steps at 4000 atoms (graph replay and eager), then where an eager step's GPU time goes
      step bench_step_cu4000 300 python3 "$repo/scripts/bench_md.py" --steps 10 --warmup 3 \
        --models sevenn,mace-medium,mace-large --systems Cu4000 --backends fastmlip,fastmlip-eager --no-sweep \
        --out "$out/bench_step_cu4000"
      step profile_md 200 python3 "$repo/scripts/profile_md.py" --cases mace-medium:Cu:10,sevenn:Cu:10 --steps 5 \
        --top 15 --out "$out"
      ;;
    profile-cu4000)
      # where an eager Cu 4000 step's GPU time goes (MACE-medium-like and SevenNet-0), under the current defaults
      step profile_md 200 python3 "$repo/scripts/profile_md.py" --cases mace-medium:Cu:10,sevenn:Cu:10 --steps 5 \
        --top 15 --out "$out"
      ;;
    mdloop-mace)
      # whole MD loops side by side: fastmlip.simulate against FastMACE 1.0 on the same model file and crystals
      step mdloop_mace 560 python3 "$repo/scripts/bench_md.py" --models mace-medium --systems Si216,Cu4000 \
        --backends fastmlip-md,fastmlip-md-verlet,fastmlip-md-replay,fastmace --md-steps 300 --md-warmup 50 --fastmace-timeout 240 --no-sweep \
        --out "$out/mdloop_mace"
      ;;
    mdloop-fastmace)
      # the default engine alone against FastMACE 1.0 (its setup is ~100 s a case): MACE-medium-like Si 216 and
      # Cu 4000, then MACE-large-like Cu 4000
      step mdloop_fastmace 330 python3 "$repo/scripts/bench_md.py" --models mace-medium --systems Si216,Cu4000 \
        --backends fastmlip-md,fastmace --md-steps 300 --md-warmup 50 --fastmace-timeout 200 --no-sweep \
        --out "$out/mdloop_fastmace"
      step mdloop_fastmace_large 240 python3 "$repo/scripts/bench_md.py" --models mace-large --systems Cu4000 \
        --backends fastmlip-md,fastmace --md-steps 300 --md-warmup 50 --fastmace-timeout 200 --no-sweep \
        --out "$out/mdloop_fastmace_large"
      ;;
    mlp-rows-cu4000)
      # the radial MLP's forward with 32 (default), 64 and 128 edges per program in 4000-atom MD loops (wgmma tiles
      # need 64 rows; at 216 atoms 64 rows lost, short of programs)
      for rows in 32 64 128; do
        step "mlp_rows_cu4000_$rows" 100 env FASTMLIP_MLP_ROWS=$rows python3 "$repo/scripts/profile_loop.py" \
          --cases sevenn:Cu:10,mace-medium:Cu:10 --steps 30 --warmup 10 --top 6 --out "$out/mlp_rows_cu4000/$rows"
      done
      ;;
    loop-vs-step-cu4000)
      # #13's "4000-atom rows no slower than the calculator path": whole MD steps against energy+forces steps
      step loop_vs_step_cu4000 280 python3 "$repo/scripts/bench_md.py" --models sevenn,mace-medium --systems Cu4000 \
        --backends fastmlip,fastmlip-md --steps 10 --warmup 3 --md-steps 100 --md-warmup 20 --no-sweep \
        --out "$out/loop_vs_step_cu4000"
      ;;
    mdloop-sevenn)
      step mdloop_sevenn 300 python3 "$repo/scripts/bench_md.py" --models sevenn --systems Si216,Cu4000 \
        --backends fastmlip,fastmlip-md,fastmlip-md-verlet,fastmlip-md-replay,cueq --md-steps 300 --md-warmup 50 --no-sweep \
        --out "$out/mdloop_sevenn"
      ;;
    linear)
      # o3.Linear tile variants and dot precisions against cuBLAS GEMMs of the same shapes (4000 rows, fp32)
      step bench_linear 240 python3 "$repo/scripts/bench_linear.py" --out "$out/bench_linear"
      ;;
    nve-ns)
      # the 1 ns NVE run (SevenNet-0, Si 216, fp32, 1 fs) in slices: each call continues the restart file kept in
      # docs/ for ~8 minutes (killed runs lose at most 1000 steps); copy $OUT's file back into docs/ after a call
      cp "$repo/docs/nve_1ns_sevenn_si216.restart" "$out/" 2> /dev/null
      step nve_1ns "${NVE_NS_LIMIT:-480}" python3 -m fastmlip.cli md --demo si --repeat 3 --ensemble nve \
        --temperature 300 --steps 1000000 --interval 1000 --restart "$out/nve_1ns_sevenn_si216.restart" --no-progress
      ;;
    mlp-layers)
      # the radial MLP's dense layers at Cu 4000 edge counts: fastmlip tiles (ieee, tf32x3) vs cuBLAS fp32 and TF32
      step bench_mlp_layers 240 python3 "$repo/scripts/bench_linear.py" --mlp --out "$out/bench_mlp_layers"
      ;;
    dots)
      # float32 dots on tensor cores (tf32x3) and the fused radial MLP at every edge count, against the defaults in
      # the same call: the fp32 model tests under them, then steps and MD loops at 216 and 4000 atoms each way
      fused=(env FASTMLIP_DOT_PRECISION=tf32x3 FASTMLIP_MLP_FUSED_MAX_ROWS=1000000000)
      step gpu_models_tf32x3 300 "${fused[@]}" python3 -m pytest -q -p no:cacheprovider -m gpu -k "float32 or tf32" \
        "$repo/tests/patches/test_gpu_models.py"
      for variant in default tf32x3; do
        prefix=(); [ $variant = tf32x3 ] && prefix=("${fused[@]}")
        step "bench_dots_$variant" 200 "${prefix[@]}" python3 "$repo/scripts/bench_md.py" --steps 10 --warmup 3 \
          --models sevenn,mace-medium,mace-large --systems Si216,Cu4000 --backends fastmlip,fastmlip-md \
          --md-steps 300 --md-warmup 50 --no-sweep --out "$out/bench_dots_$variant"
      done
      ;;
    defaults)
      # the model, graph and radial-MLP GPU tests under the current defaults, then SevenNet-0 Cu 4000 steps with
      # the radial MLP fused (default) against e3nn's matmuls above 32,768 edges, same call
      step gpu_tests_defaults 300 python3 -m pytest -q -p no:cacheprovider -m gpu -rf \
        "$repo/tests/patches/test_gpu_models.py" "$repo/tests/faces/test_cuda_graph.py" "$repo/tests/ops/test_radial_mlp.py"
      for rows in 32768 default; do
        prefix=(); [ $rows = default ] || prefix=(env FASTMLIP_MLP_FUSED_MAX_ROWS=$rows)
        step "bench_mlp_fused_$rows" 100 "${prefix[@]}" python3 "$repo/scripts/bench_md.py" --steps 10 --warmup 3 \
          --models sevenn --systems Cu4000 --backends fastmlip --no-sweep --out "$out/bench_mlp_fused_$rows"
      done
      ;;
    sweep)
      # the largest Cu fcc per GPU: fastmlip (convolutions chunked from free memory) against cuEquivariance
      # (cuEquivariance first: it stops at its out-of-memory size early; the ratio needs both)
      step sweep_sevenn 440 python3 "$repo/scripts/bench_md.py" --models sevenn --systems Cu4000 --steps 3 \
        --warmup 1 --backends fastmlip --sweep-backends cueq,fastmlip --sweep-repeats 10,20,32,36,50,63 \
        --max-step-ms 8000 --out "$out/sweep_sevenn"
      ;;
    sweep-mace)
      # the same for MACE-medium-like (cuEquivariance first; FastMACE's size limit is its own md-loop row)
      step sweep_mace 480 python3 "$repo/scripts/bench_md.py" --models mace-medium --systems Cu4000 --steps 3 \
        --warmup 1 --backends fastmlip --sweep-model mace-medium --sweep-backends cueq,fastmlip \
        --sweep-repeats 10,20,32,50,63 --max-step-ms 8000 --out "$out/sweep_mace"
      ;;
    conv-split)
      # rows shared by several programs in the convolution's row-owned kernels (FASTMLIP_CONV_SPLIT_ROWS): the
      # 216-atom aggregate ran ~80 us a launch with 8-11% of an SM's warps (ncu-small); its tests on the GPU, the
      # 216-atom loops profiled per split, then Cu 4000 steps with one part (above the row limit) and with four
      step split_tests 150 python3 -m pytest -q -p no:cacheprovider -k "split" \
        "$repo/tests/kernels/test_conv_triton.py"
      profile_knobs conv_split base: p4e12:FASTMLIP_CONV_SPLIT_ROWS=1000 \
        p2e24:"FASTMLIP_CONV_SPLIT_ROWS=1000 FASTMLIP_CONV_SPLIT_PARTS=2 FASTMLIP_CONV_SPLIT_EDGES=24" \
        p8e6:"FASTMLIP_CONV_SPLIT_ROWS=1000 FASTMLIP_CONV_SPLIT_PARTS=8 FASTMLIP_CONV_SPLIT_EDGES=6"
      for variant in base one four; do
        case $variant in
          one) knobs=(FASTMLIP_CONV_SPLIT_ROWS=1000) ;; four) knobs=(FASTMLIP_CONV_SPLIT_ROWS=100000) ;; *) knobs=() ;;
        esac
        step "cu4000_split_$variant" 120 env "${knobs[@]}" python3 "$repo/scripts/bench_md.py" --steps 10 \
          --warmup 3 --models sevenn,mace-medium --systems Cu4000 --backends fastmlip --no-sweep \
          --out "$out/cu4000_split_$variant"
      done
      rm -f "$out"/*.png
      ;;
    sweep-fastmace)
      # the largest MACE-medium-like Cu fcc per GPU: fastmlip and FastMACE 1.0 in the same run (the memory issue's
      # sweep; cuEquivariance's limit, 32,000 ran and 131,072 did not, is in docs/memory.md), a few whole MD steps
      # per size for FastMACE, whose setup alone takes ~80 s
      step sweep_fastmace 560 python3 "$repo/scripts/bench_md.py" --models mace-medium --systems Cu4000 --steps 3 \
        --warmup 1 --backends fastmlip --sweep-model mace-medium --sweep-backends fastmlip,fastmace \
        --sweep-repeats 10,32,50,63 --md-steps 5 --md-warmup 2 --fastmace-timeout 200 --max-step-ms 8000 \
        --out "$out/sweep_fastmace"
      ;;
    loop-profile)
      # is the GPU busy during fastmlip.simulate at 216 atoms, and with how many kernels per step?
      step profile_loop 240 python3 "$repo/scripts/profile_loop.py" \
        --cases "${PROFILE_CASES:-mace-medium:Si:3,sevenn:Si:3}" --steps 200 --warmup 50 --out "$out"
      ;;
    loop-profile-exported)
      # the same loops beside the models as `fastmlip convert --to exported` writes them (the fast-start path)
      step profile_loop_exported 400 python3 "$repo/scripts/profile_loop.py" --cases sevenn:Si:3,mace-medium:Si:3 \
        --steps 200 --warmup 50 --top 12 --exported --out "$out/exported"
      ;;
    lammps-gpu)
      # LAMMPS with ML-IAP's Python coupling, built here from the carried source (.devlammps/lammps-src.tar.xz:
      # LAMMPS 29 Aug 2024's core, ML-IAP, ML-SNAP and PYTHON, no MPI), then LAMMPS against fastmlip.simulate
      libdir=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
      export LD_LIBRARY_PATH=$libdir:${LD_LIBRARY_PATH:-}
      cythonize=$(dirname "$(command -v python3)")/cythonize
      rm -rf /tmp/lmp && mkdir -p /tmp/lmp/src && tar xJf "$repo/.devlammps/lammps-src.tar.xz" -C /tmp/lmp/src
      step lammps_build 420 bash -c "cmake -S /tmp/lmp/src/cmake -B /tmp/lmp/build -G Ninja -D BUILD_SHARED_LIBS=on \
        -D BUILD_MPI=off -D PKG_ML-IAP=on -D PKG_ML-SNAP=on -D PKG_PYTHON=on -D MLIAP_ENABLE_PYTHON=on \
        -D Python_EXECUTABLE=$(command -v python3) $([ -x "$cythonize" ] && echo "-D Cythonize_EXECUTABLE=$cythonize") \
        && ninja -C /tmp/lmp/build"
      cp -a /tmp/lmp/build/liblammps.so* /tmp/lmp/src/python/lammps/
      export PYTHONPATH=/tmp/lmp/src/python:$PYTHONPATH
      mv /tmp/baselines/site/openequivariance /tmp/baselines/openequivariance.aside 2> /dev/null  # sevenn would JIT it
      step bench_lammps 300 python3 "$repo/scripts/bench_lammps.py" --repeats 4,6 --steps 100 --warmup 10 --out "$out"
      mv /tmp/baselines/openequivariance.aside /tmp/baselines/site/openequivariance 2> /dev/null
      ;;
    radial-table-tests)
      # radial MLPs read from tables (FASTMLIP_RADIAL_TABLE): the ops' and the models' tests, kernels on the GPU (the
      # convolution that reads a table makes d/dr in its sender walk, or with FASTMLIP_TABLE_GRADIENT=table stores
      # the weight gradient for the table's backward)
      step radial_table_tests 300 python3 -m pytest -v -rf -p no:cacheprovider "$repo/tests/ops/test_radial_table.py" \
        "$repo/tests/ops/test_table_conv.py" "$repo/tests/patches/test_radial_tables.py" \
        "$repo/tests/patches/test_models_triton.py"
      ;;
    radial-table)
      # the Cu 4000 MD loops profiled per variant (TABLE_VARIANTS: NAME:VAR=VALUE,... each; default the MLP, a table
      # with d/dr made in the walk, and the table read by the convolution's kernels: no weights in memory; e.g.
      # lengths-table:FASTMLIP_RADIAL_TABLE=lengths,FASTMLIP_TABLE_GRADIENT=table for the weight gradient read by
      # the table's backward)
      for spec in ${TABLE_VARIANTS:-off:FASTMLIP_RADIAL_TABLE=off lengths:FASTMLIP_RADIAL_TABLE=lengths \
                  conv:FASTMLIP_RADIAL_TABLE=conv}; do
        variant=${spec%%:*} knobs=${spec#*:}
        step "table_cu4000_$variant" 180 env ${knobs//,/ } python3 "$repo/scripts/profile_loop.py" \
          --cases "${PROFILE_CASES:-mace-medium:Cu:10,sevenn:Cu:10}" --steps 50 --warmup 20 --top 12 \
          --out "$out/table_cu4000_$variant"
      done
      ;;
    radial-table-small)
      profile_knobs table_small off:FASTMLIP_RADIAL_TABLE=off edges:FASTMLIP_RADIAL_TABLE=edges \
        lengths:FASTMLIP_RADIAL_TABLE=lengths \
        lengths-table:"FASTMLIP_RADIAL_TABLE=lengths FASTMLIP_TABLE_GRADIENT=table" conv:FASTMLIP_RADIAL_TABLE=conv
      ;;
    loop-profile-cu4000)
      # the same at 4000 atoms (Cu fcc 10x10x10): what the MD loop adds to an energy+forces step there
      step profile_loop_cu4000 300 python3 "$repo/scripts/profile_loop.py" \
        --cases "${PROFILE_CASES:-mace-medium:Cu:10,sevenn:Cu:10}" \
        --steps 50 --warmup 20 --top 20 --out "$out/cu4000"
      ;;
    batch)
      # fastmlip.evaluate on 1000 64-atom cells against a Calculator loop (SevenNet-0, Si and Cu cells mixed)
      # with TorchSim's batched FIRE where scripts/pack_torchsim.sh packed it into .devbundle
      torchsim=()
      if [ -f .devbundle/torchsim.tar.xz ]; then
        mkdir -p /tmp/baselines/torchsim && tar xJf .devbundle/torchsim.tar.xz -C /tmp/baselines/torchsim
        export PYTHONPATH=$PYTHONPATH:/tmp/baselines/torchsim
        torchsim=(--torchsim)
      fi
      step bench_batch 300 python3 "$repo/scripts/bench_batch.py" --species Si,Cu "${torchsim[@]}" \
        --out "$out/bench_batch"
      ;;
    setup-profile)
      # SevenNet-0's warm start under cProfile, torch and sevenn imported before it starts (its first dry-run pass
      # took 4.3-4.7 s with every kernel cached, MACE-medium-like's 0.9-1.4 s)
      as_installed step setup_profile 200 python3 "$repo/scripts/bench_cold_start.py" --cases sevenn --profile \
        --out "$out/setup"
      ;;
    mlp-rows)
      # edges per radial-MLP program at 216 atoms (~6.5k edges), whole MD loops of SevenNet-0 and MACE-medium-like
      # Si 216: 16 rows measured slower than the default 32 (2026-12-03), so larger blocks now (each program
      # reloads the last layer's weights)
      for rows in 32 64 128; do
        step "mdloop_rows$rows" 200 env FASTMLIP_MLP_ROWS=$rows python3 "$repo/scripts/bench_md.py" \
          --models sevenn,mace-medium --systems Si216 --backends fastmlip-md --md-steps 300 --md-warmup 50 \
          --no-sweep --out "$out/mdloop_rows$rows"
      done
      ;;
    knobs-small)
      # the latency-bound 216-atom step under each convolution and radial-MLP knob, profiled (2026-12-03: unroll 2
      # and 64 backward rows won and became the defaults; these are the next candidates)
      profile_knobs knobs_small base: u4:FASTMLIP_CONV_UNROLL=4 atomic:FASTMLIP_CONV_ATOMIC_ROWS=1000000 \
        bwd128:FASTMLIP_MLP_BACKWARD_ROWS=128 fwd16:FASTMLIP_MLP_ROWS=16
      ;;
    knobs-wide)
      # more warps in flight at 216 atoms: edges side by side in the aggregate (FASTMLIP_CONV_EDGE_LANES: [lanes,
      # channels] tiles on the 216 x 4-7 row programs ncu-small found at 8-11% occupancy) and radial-MLP forward
      # programs sharing a row block by columns (FASTMLIP_MLP_COLUMN_GROUPS)
      # (six variants: ~70 s each fits one call)
      profile_knobs knobs_wide base: l2:FASTMLIP_CONV_EDGE_LANES=2 l4:FASTMLIP_CONV_EDGE_LANES=4 \
        c2:FASTMLIP_MLP_COLUMN_GROUPS=2 c4:FASTMLIP_MLP_COLUMN_GROUPS=4 bu1:FASTMLIP_CONV_BACKWARD_UNROLL=1
      ;;
    wide-cu4000)
      # a winner at 216 atoms must not lose at 4000: Cu 4000 energy+forces steps under each candidate setting
      # (o3.Linear 32-column tiles won at 216 atoms, knobs-linear 2026-12-03; the wide settings: knobs-wide)
      for variant in base lin32 lanes4 cols4 bu1; do
        case $variant in
          lin32) knobs=(FASTMLIP_LINEAR_BLOCK=32) ;; lanes4) knobs=(FASTMLIP_CONV_EDGE_LANES=4) ;;
          cols4) knobs=(FASTMLIP_MLP_COLUMN_GROUPS=4) ;; bu1) knobs=(FASTMLIP_CONV_BACKWARD_UNROLL=1) ;;
          *) knobs=() ;;
        esac
        step "cu4000_$variant" 120 env "${knobs[@]}" python3 "$repo/scripts/bench_md.py" --steps 10 --warmup 3 \
          --models sevenn,mace-medium --systems Cu4000 --backends fastmlip --no-sweep --out "$out/cu4000_$variant"
      done
      rm -f "$out"/*.png
      ;;
    knobs-linear)
      # the same for the o3.Linear tiles, whose wide programs used 255 registers and spilled at 216 atoms (ncu-small)
      profile_knobs knobs_linear base: k32:FASTMLIP_LINEAR_K=32 b32:FASTMLIP_LINEAR_BLOCK=32 \
        rows32:FASTMLIP_LINEAR_ROWS=32
      ;;
    ncu-small)
      # hardware counters of one MD step's own kernels at 216 atoms (occupancy, stall reasons, throughput): why
      # the radial-MLP backward and the convolution's aggregate take 40-180 us a launch on ~6-10k edges
      kernels='regex:^(radial_mlp_backward|radial_mlp_forward|aggregate|linear)$'
      sections=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
                --section MemoryWorkloadAnalysis)
      step ncu_mace 240 ncu -k "$kernels" --launch-skip 300 --launch-count 26 "${sections[@]}" \
        python3 "$repo/scripts/profile_loop.py" --cases mace-medium:Si:3 --steps 3 --warmup 20 --top 3
      step ncu_sevenn 240 ncu -k "$kernels" --launch-skip 600 --launch-count 54 "${sections[@]}" \
        python3 "$repo/scripts/profile_loop.py" --cases sevenn:Si:3 --steps 3 --warmup 20 --top 3
      ;;
    defaults-check)
      # the kernel defaults of 2026-12-03 (conv unroll 2, radial-MLP backward 64 rows) against the old ones (1, 32)
      # and against the MLP change alone, at Cu 4000 (eager steps), then the MD loops at 216 atoms
      # (the MLP change alone last: the least needed if the call runs short)
      for variant in new old mdloop bwd64; do
        case $variant in
          old) knobs=(FASTMLIP_CONV_UNROLL=1 FASTMLIP_MLP_BACKWARD_ROWS=32) ;; bwd64) knobs=(FASTMLIP_CONV_UNROLL=1) ;;
          *) knobs=() ;;
        esac
        if [ $variant = mdloop ]; then
          step mdloop_new 150 python3 "$repo/scripts/bench_md.py" --models sevenn,mace-medium --systems Si216 \
            --backends fastmlip-md --md-steps 300 --md-warmup 50 --no-sweep --out "$out/mdloop_new"
        else
          step "cu4000_$variant" 120 env "${knobs[@]}" python3 "$repo/scripts/bench_md.py" --steps 10 --warmup 3 \
            --models sevenn,mace-medium --systems Cu4000 --backends fastmlip --no-sweep --out "$out/cu4000_$variant"
        fi
      done
      rm -f "$out"/*.png
      ;;
    cell-pairs)
      # whole MD steps above 4096 atoms: pairs rebuilt in the graph through the cell list (the default since
      # 2026-12-03: 78.7 against 86.6 ms/step) against the Verlet candidates, SevenNet-0 Cu 32000, then the GPU
      # test of the list
      for variant in verlet cells; do
        knobs=(); [ $variant = verlet ] && knobs=(FASTMLIP_GRAPH_PAIRS_MAX_ATOMS=4096)
        step "mdloop_cu32000_$variant" 200 env "${knobs[@]}" python3 "$repo/scripts/bench_md.py" --models sevenn \
          --systems Cu32000 --backends fastmlip-md --md-steps 100 --md-warmup 20 --no-sweep \
          --out "$out/mdloop_cu32000_$variant"
      done
      rm -f "$out"/*.png
      step cell_pairs_test 120 python3 -m pytest -q -p no:cacheprovider -m gpu -k cell_list "$repo/tests/faces/test_graph_pairs.py"
      ;;
    conv-small)
      # the convolution at a 216-atom graph (216 nodes x 30 edges), where a profiled aggregate took ~45 us a launch:
      # receiver-owned CSR programs (216 x channel blocks: latency-bound?) against the atomic edge-chunk path
      step bench_kernels_small 240 python3 "$repo/scripts/bench_kernels.py" --dtypes float32 --nodes 216 --degree 30 \
        --impls fastmlip,fastmlip-atomic,cueq-ir_mul --problems mace-medium,7net0-l1 --precompile 14 \
        --out "$out/bench_kernels_small"
      ;;
    conv)
      # the packed OpenEquivariance is an sdist: its extension is JIT-built at the first import, and the bench's 14
      # compile workers each waited on that build's lock (2026-12-04: the phase ran out of time with no row), so
      # it is built once first
      step oeq_build 240 python3 -c "import openequivariance"
      step bench_kernels 330 python3 "$repo/scripts/bench_kernels.py" --dtypes float32 \
        --impls fastmlip,cueq-ir_mul,oeq-det --precompile 14 --out "$out"
      ;;
    *)
      echo "unknown phase $phase" >&2
      ;;
  esac
done
# at most 8 files come back: the step logs travel as one archive (their tails are printed above)
(cd "$out" && ls *.log > /dev/null 2>&1 && tar czf logs.tgz *.log && rm -f *.log)
ls -la "$out"
