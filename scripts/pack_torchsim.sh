#!/bin/bash
# Pack TorchSim for the device (its Python 3.12 has no torch_sim): torch_sim and the PyTables it imports, from a
# local Python 3.12 environment, into .devbundle/torchsim.tar.xz (~4 MB). Its optional nvalchemiops/Warp (390 MB)
# stays out: torch_sim falls back to its torch neighbour lists. device_session.sh's batch phase unpacks it.
#   bash scripts/pack_torchsim.sh [/work/venv312]
set -euo pipefail
venv=${1:-/work/venv312}
site=$(echo "$venv"/lib/python3.12/site-packages)
out=$(pwd)/.devbundle/torchsim.tar.xz
cd "$site"
tar cJf "$out" --exclude=__pycache__ torch_sim torch_sim_atomistic-*.dist-info tables tables-*.dist-info tables.libs \
  numexpr numexpr-*.dist-info
ls -la "$out"
