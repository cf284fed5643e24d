"""Output locations that cannot be used: one clear line, exit code 2, nothing lost or half
written, and (for existing outputs) refused before the scan is scored.

Real files and folders only: a regular file given as the output folder, a folder under /proc
(which even root cannot write), a folder standing where an output file belongs.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_vaeloc.cli import main
from napari_vaeloc.errors import OutputError, OutputExistsError
from napari_vaeloc.export import output_paths, planned_paths
from napari_vaeloc.io import Volume, WriteSet, check_output_folder
from napari_vaeloc.samples import sample_path

from .helpers import listing as _listing

SCAN = sample_path("t2-lesion")
STEM = "sample_t2_lesion"
COMMANDS = ("localize", "demo")


def _argv(command: str, out: Path | str, *extra: str, quiet: bool = True) -> list[str]:
    head = ["localize", str(SCAN)] if command == "localize" else ["demo", "--sample", "t2-lesion"]
    tail = ["--quiet"] if quiet else []
    return [*head, "--model", "t2-brain", "--device", "cpu", "--out", str(out), *extra, *tail]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vaeloc: error: "), err
    assert "Traceback" not in err
    return lines[0]


# fault 1: the output folder is a regular file, or lies under one


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("below", [False, True], ids=["file", "under-file"])
def test_output_folder_that_is_a_file(tmp_path, capsys, command, below):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    out = blocker / "sub" if below else blocker
    before = _listing(tmp_path)
    assert main(_argv(command, out)) == 2
    line = _one_error_line(capsys)
    assert str(blocker) in line and "not a folder" in line
    assert _listing(tmp_path) == before


# fault 2: a folder that cannot be written, even by root


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc")
@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_output_folder(capsys, command):
    out = Path("/proc/vaeloc-test-out")
    assert main(_argv(command, out)) == 2
    line = _one_error_line(capsys)
    assert str(out) in line
    assert not out.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc")
def test_unwritable_existing_folder_is_probed():
    # /proc exists and is a folder, yet no file can be made in it: only a real probe sees that
    with pytest.raises(OutputError, match="cannot write to the output folder /proc") as err:
        check_output_folder("/proc")
    assert err.value.path == Path("/proc") and "\n" not in str(err.value)


# fault 3: with --overwrite, one target is a folder: nothing of the set may be written


@pytest.mark.parametrize("command", COMMANDS)
def test_folder_in_place_of_an_output_file(tmp_path, capsys, command):
    out = tmp_path / "out"
    (out / f"{STEM}_scores.json").mkdir(parents=True)
    (out / f"{STEM}_scores.json" / "keep.txt").write_text("mine")
    (out / f"{STEM}_mask.nii.gz").write_bytes(b"old mask")  # would be replaced, must survive
    before = _listing(tmp_path)
    assert main(_argv(command, out, "--overwrite")) == 2
    line = _one_error_line(capsys)
    assert f"{STEM}_scores.json" in line and "folder" in line
    assert _listing(tmp_path) == before


# fault 5: existing outputs are refused before the scan is scored


@pytest.mark.parametrize("command", COMMANDS)
def test_existing_outputs_refused_before_scoring(tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{STEM}_mask.nii.gz").write_bytes(b"old mask")
    before = _listing(tmp_path)
    start = time.perf_counter()
    rc = main(_argv(command, out, quiet=False))  # not quiet: a progress bar would show
    seconds = time.perf_counter() - start
    assert rc == 2
    line = _one_error_line(capsys)  # no progress bar, no stage lines
    assert f"{STEM}_mask.nii.gz" in line and "--overwrite" in line
    assert seconds < 1.5, f"took {seconds:.1f} s: the scan was scored before the refusal"
    assert _listing(tmp_path) == before


def test_planned_paths_match_what_is_written():
    vol = Volume.from_array(np.arange(8, dtype=np.float32).reshape(2, 2, 2))
    assert planned_paths(SCAN, "o") == output_paths(Path("o"), STEM)
    assert planned_paths(vol, "o", stem="x")["mask"] == Path("o/x_mask.nii.gz")
    assert planned_paths(None, "o")["scores"] == Path("o/scan_scores.json")


# the staging writer behind write_result


def _ok(text: str):
    return lambda tmp: tmp.write_text(text)


def _disk_full(tmp: Path) -> None:
    tmp.write_bytes(b"half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_write_set_failure_in_the_middle_leaves_nothing(tmp_path):
    (tmp_path / "b.txt").write_text("old b")
    before = _listing(tmp_path)
    with pytest.raises(OutputError) as err:
        with WriteSet(overwrite=True) as ws:
            ws.add(tmp_path / "a.txt", _ok("new a"))
            ws.add(tmp_path / "b.txt", _ok("new b"))
            ws.add(tmp_path / "c.txt", _disk_full)
            ws.add(tmp_path / "d.txt", _ok("new d"))
    assert str(err.value) == f"cannot write {tmp_path / 'c.txt'}: No space left on device"
    assert err.value.path == tmp_path / "c.txt"
    assert _listing(tmp_path) == before  # no file of the set, no temporary file


def test_write_set_side_by_side_writes_all_or_none(tmp_path):
    """add_all on threads: every file on success; one failing write leaves none of them."""
    import threading

    threads: set[int] = set()

    def slow(text: str):
        def write(tmp: Path) -> None:
            threads.add(threading.get_ident())
            time.sleep(0.05)
            tmp.write_text(text)

        return write

    with WriteSet() as ws:
        got = ws.add_all([(tmp_path / f"{i}.txt", slow(str(i))) for i in range(4)], workers=2)
    assert got == [tmp_path / f"{i}.txt" for i in range(4)] and len(threads) == 2
    assert _listing(tmp_path) == {f"{i}.txt": str(i).encode() for i in range(4)}
    (tmp_path / "x").mkdir()
    before = _listing(tmp_path)
    with pytest.raises(OutputError, match="No space left on device"):
        with WriteSet() as ws:
            sub = tmp_path / "x"
            items = [(sub / "a.txt", slow("a")), (sub / "b.txt", _disk_full)]
            ws.add_all([*items, (sub / "c.txt", slow("c"))], workers=2)
    assert _listing(tmp_path) == before  # neither the written files nor temporary ones


def test_write_set_other_error_in_the_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with WriteSet() as ws:
            ws.add(tmp_path / "a.txt", _ok("a"))
            raise RuntimeError("stopped")
    assert _listing(tmp_path) == {}


def test_write_set_refuses_at_commit_and_writes_none(tmp_path):
    with pytest.raises(OutputExistsError):
        with WriteSet() as ws:
            ws.add(tmp_path / "a.txt", _ok("a"))
            ws.add(tmp_path / "b.txt", _ok("b"))
            (tmp_path / "b.txt").write_text("someone else's")  # appears meanwhile
    assert _listing(tmp_path) == {"b.txt": b"someone else's"}


def test_write_set_writes_all_together(tmp_path):
    with WriteSet() as ws:
        ws.add(tmp_path / "sub" / "a.txt", _ok("a"))
        ws.add_json({"x": float("nan")}, tmp_path / "sub" / "b.json")
        assert _listing(tmp_path).keys() >= {"sub/"}
        assert not (tmp_path / "sub" / "a.txt").exists()  # staged only
    assert _listing(tmp_path) == {
        "sub/": None,
        "sub/a.txt": b"a",
        "sub/b.json": b'{\n  "x": null\n}\n',
    }


# the export dialog's notification


def test_export_failure_is_one_clear_line(tmp_path):
    from napari_vaeloc._widget_export import export_failure

    target = tmp_path / "scan_mask.nii.gz"
    try:
        open(tmp_path / "missing" / "x", "rb")
    except OSError as exc:
        raw = exc
    assert export_failure(raw) == (
        f"export failed: No such file or directory: {tmp_path / 'missing' / 'x'}"
    )
    folder_err = OutputError(target, f"cannot write {target}: a folder of that name is in the way")
    assert export_failure(folder_err) == f"export failed: {folder_err}"


# `vaeloc models`: columns computed from the content


def test_models_table_columns_line_up(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rows = lines[0], lines[1:]
    assert rows, "no bundled models"
    names = re.split(r" {2,}", header.strip())  # columns are two or more spaces apart
    assert names[-1] == "trained on"
    assert names[0] == "name"
    starts = [header.index(n) for n in names]
    for row in rows:
        for i, s in enumerate(starts):
            assert row[s] != " ", (row, names[i])
            if s:
                assert row[s - 1] == " " and row[s - 2] == " ", (row, names[i])
        # every entry but the last (the sources) has no spaces: one entry per column
        assert len(row[: starts[-1]].split()) == len(names) - 1, row
    assert "slice px" in names and "latent dims" in names  # the sizes say what they count
    assert any(r.startswith("t1-brain-sagittal  ") for r in rows)
