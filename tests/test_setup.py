"""scripts/setup.sh: the Debian packages `--dev` needs, checked with the real dpkg database."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"
ABSENT = "vaeloc-no-such-package"

needs_dpkg = pytest.mark.skipif(
    shutil.which("dpkg-query") is None, reason="not a Debian system (no dpkg-query)"
)


def run_sourced(code: str, as_nobody: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in bash after sourcing a copy of setup.sh that every user can read,
    optionally as the unprivileged user ``nobody``."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "setup.sh"
        shutil.copyfile(SETUP, script)
        Path(tmp).chmod(0o755)
        script.chmod(0o644)
        cmd = ["bash", "-c", f'source "$1"; {code}', "bash", str(script)]
        if as_nobody and os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_rejects_unknown_options():
    out = subprocess.run(
        ["bash", str(SETUP), "--devv"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2 and "usage" in out.stderr


@needs_dpkg
def test_missing_debs_names_only_uninstalled_packages():
    out = run_sourced(f"missing_debs bash {ABSENT} dpkg")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [ABSENT]


@needs_dpkg
def test_nothing_to_do_when_installed():
    out = run_sourced("DEV_DEBS=(bash dpkg); ensure_dev_debs")
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


@needs_dpkg
@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None, reason="cannot drop root"
)
def test_without_root_names_missing_packages_and_the_command():
    out = run_sourced(f"DEV_DEBS=(bash {ABSENT}); ensure_dev_debs; echo went on", as_nobody=True)
    assert out.returncode == 1
    assert "went on" not in out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert f"missing Debian packages the tests need: {ABSENT};" in lines[0]
    assert lines[0].endswith(f"apt-get install -y --no-install-recommends {ABSENT}")
