"""Output faults through the `vaeloc` command, on real file systems: a read-only folder and a
full disk (a tmpfs of 64 KiB) made with a private mount namespace (`unshare -rm`, no root
needed), a move that fails half-way through a result set (a file bind-mounted over the last
target, so renaming onto it fails with "Device or resource busy"), a run killed with SIGKILL
while writing, and the staging folder such a run leaves behind.

Each asserts the exit status, one line on stderr naming the path and the cause, no
traceback, and the files on disk afterwards: the whole set or none of it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc.cli import main
from napari_vaeloc.export import planned_paths

from ..helpers import listing as _listing

PY = [sys.executable, "-m", "napari_vaeloc.cli"]


def _can_unshare() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(
    not _can_unshare(), reason="needs Linux mount namespaces (unshare -rm)"
)


@pytest.fixture
def scan(tmp_path) -> Path:
    data = np.random.default_rng(0).random((64, 64, 48)).astype(np.float32) * 100
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])), path)
    return path


def _localize_argv(scan: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["localize", str(scan), "--model", str(model), "--out", str(out), "--device", "cpu",
            *extra]  # fmt: skip


def _in_namespace(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a shell script as root of a private user and mount namespace."""
    return subprocess.run(
        ["unshare", "-rm", "sh", "-ec", script], capture_output=True, text=True, timeout=timeout
    )


def _error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vaeloc: error: ") and "Traceback" not in stderr
    return lines[0]


def _cmd(argv: list[str]) -> str:
    return " ".join(f"'{a}'" for a in [*PY, *argv])


@needs_unshare
@pytest.mark.parametrize("command", ["localize", "prepare", "train"])
def test_read_only_output_folder_refused_before_any_work(tmp_path, scan, tiny_model_dir, command):
    out = tmp_path / "ro"
    out.mkdir()
    if command == "localize":
        argv = _localize_argv(scan, tiny_model_dir, out)  # not quiet: a bar would show
    elif command == "prepare":
        argv = ["prepare", str(scan), "--model", str(tiny_model_dir), "--out", str(out)]
    else:
        argv = ["train", str(scan), "--out", str(out / "model"), "--max-steps", "5"]
    proc = _in_namespace(f"mount -t tmpfs -o ro tmpfs '{out}'\n{_cmd(argv)} || echo rc=$?\n")
    # one line and nothing else: no stage was announced and no progress bar drawn before it
    line = _error_line(proc.stderr)
    assert str(out) in line and "Read-only file system" in line
    assert proc.stdout.strip() == "rc=2", proc.stdout  # no stage began, none reported done


@needs_unshare
def test_full_disk_leaves_nothing(tmp_path, scan, tiny_model_dir):
    out = tmp_path / "full"
    out.mkdir()
    argv = _localize_argv(scan, tiny_model_dir, out, "--quiet")
    proc = _in_namespace(
        f"mount -t tmpfs -o size=64k tmpfs '{out}'\n"
        f"{_cmd(argv)} || echo rc=$?\n"
        f"echo left=$(ls -A '{out}')"
    )
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("note: ")]
    line = _error_line("\n".join(lines))
    assert "No space left on device" in line and f"cannot write {out}/scan_" in line
    assert "rc=2" in proc.stdout
    assert proc.stdout.strip().endswith("left="), proc.stdout  # not even a staging folder


@needs_unshare
def test_failed_last_move_gives_back_the_previous_set(tmp_path, scan, tiny_model_dir, capsys):
    out = tmp_path / "out"
    assert main(_localize_argv(scan, tiny_model_dir, out, "--quiet")) == 0
    before = _listing(out)
    scores = out / "scan_scores.json"
    assert list(planned_paths(scan, out).values())[-1] == scores  # moved last
    argv = _localize_argv(scan, tiny_model_dir, out, "--quiet", "--overwrite", "--threshold", "0")
    blocker = tmp_path / "blocker.json"
    blocker.write_text("{}")
    proc = _in_namespace(
        f"mount --bind '{blocker}' '{scores}'\n"  # renaming onto a mount point: EBUSY
        f"{_cmd(argv)} || echo rc=$?"
    )
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("note: ")]
    line = _error_line("\n".join(lines))
    assert line == f"vaeloc: error: cannot write {scores}: Device or resource busy"
    assert "rc=2" in proc.stdout
    assert _listing(out) == before  # every replaced file given back, no staging folder


def test_killed_run_leaves_no_result_and_the_rerun_needs_no_overwrite(
    tmp_path, scan, tiny_model_dir, capsys
):
    out = tmp_path / "out"
    argv = _localize_argv(scan, tiny_model_dir, out, "--quiet")
    proc = subprocess.Popen([*PY, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged: list[str] = []
    deadline = time.monotonic() + 120
    while not staged and proc.poll() is None and time.monotonic() < deadline:
        try:  # the run's up-front checks may make and remove the folder meanwhile
            staged = [f for d in out.glob(".vaeloc-partial-*") for f in os.listdir(d)
                      if "scan_" in f]  # fmt: skip
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staged, "the run ended before it wrote anything"
    left = sorted(os.listdir(out))
    assert len(left) == 1 and left[0].startswith(".vaeloc-partial-"), left  # no result file

    assert main(argv) == 0  # no --overwrite
    targets = planned_paths(scan, out)
    assert sorted(os.listdir(out)) == sorted(p.name for p in targets.values())
    for p in targets.values():
        if p.suffix == ".gz":
            assert nib.load(p).shape == (64, 64, 48)


def _leftover(out: Path, names: list[str], placed: int) -> Path:
    """A staging folder exactly as a run killed during its moves leaves it: every file of the
    set staged, the first ``placed`` of them already linked into place, the lock released."""
    staging = out / ".vaeloc-partial-k1ll3d"
    staging.mkdir(parents=True)
    (staging / ".vaeloc-lock").write_bytes(b"")
    for name in names:
        (staging / name).write_bytes(b"from the killed run")
    for name in names[:placed]:
        os.link(staging / name, out / name)
    return staging


def test_run_killed_during_its_moves_is_rolled_back(tmp_path, scan, tiny_model_dir, capsys):
    out = tmp_path / "out"
    targets = planned_paths(scan, out)
    names = [p.name for p in targets.values()]
    staging = _leftover(out, names, placed=4)
    (out / "notes.txt").write_text("mine")  # not the killed run's: kept
    assert main(_localize_argv(scan, tiny_model_dir, out, "--quiet")) == 0  # no --overwrite
    assert not staging.exists()
    assert sorted(os.listdir(out)) == sorted([*names, "notes.txt"])
    for p in targets.values():
        assert p.read_bytes() != b"from the killed run"
    assert (out / "notes.txt").read_text() == "mine"


def test_staging_folder_of_a_live_run_is_left_alone(tmp_path, scan, tiny_model_dir, capsys):
    out = tmp_path / "out"
    names = [p.name for p in planned_paths(scan, out).values()]
    staging = _leftover(out, names[:1], placed=0)
    fd = os.open(staging / ".vaeloc-lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a run that is still writing
    try:
        assert main(_localize_argv(scan, tiny_model_dir, out, "--quiet")) == 0
        assert (staging / names[0]).read_bytes() == b"from the killed run"
    finally:
        os.close(fd)


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_output_folder_that_is_a_file(tmp_path, scan, tiny_model_dir, capsys, command):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    if command == "prepare":
        argv = ["prepare", str(scan), "--model", str(tiny_model_dir), "--out", str(blocker)]
    else:
        argv = ["train", str(scan), "--out", str(blocker / "model"), "--max-steps", "5"]
    assert main([*argv, "--quiet"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(blocker) in line and "not a folder" in line
    assert blocker.read_text() == "not a folder"
