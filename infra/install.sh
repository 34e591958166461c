#!/usr/bin/env bash
# The one install of recsqueeze's Python environment. The Makefile's .venv target and the
# Dockerfile both run it, so a laptop, CI and the cluster image get the same packages the
# same way (tests/unit/test_k8s_manifests.py checks that both call it).
#
#   infra/install.sh VENV [EXTRAS]      e.g. infra/install.sh .venv dev
#
# TORCH        the torch requirement installed first (default torch==2.13.0): an unpinned torch
#              would take whatever CUDA build the index offers
# TORCH_INDEX  an index URL for it (pytorch.org's cpu or cu12x wheel index); none by default
# EDITABLE=1   install the project editable (a checkout); the image installs it as a package
# PY           the Python that creates VENV (default python3)
set -euo pipefail
venv=${1:?usage: infra/install.sh VENV [EXTRAS]}
extras=${2:-}
cd "$(dirname "$0")/.."
quiet() { grep -v '^WARNING: Location' || true; }  # pip's note on this machine's local index
test -x "$venv/bin/python" || "${PY:-python3}" -m venv "$venv"
"$venv/bin/pip" install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "${TORCH:-torch==2.13.0}" \
  2>&1 | quiet
"$venv/bin/pip" install -q ${EDITABLE:+-e} ".${extras:+[$extras]}" 2>&1 | quiet
