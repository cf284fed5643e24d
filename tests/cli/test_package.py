"""The layout of the `vaeloc` package: options defined once, early checks, generated help."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import napari_vaeloc.cli as cli
from napari_vaeloc.cli import build_parser, main
from napari_vaeloc.mapnames import AXIS_NAMES, COMBINABLE_MAPS, DEFAULT_MAPS
from napari_vaeloc.samples import sample_path

PACKAGE_SOURCES = sorted(Path(cli.__file__).parent.glob("*.py"))


def _subparser(*names: str):
    p = build_parser()
    for name in names:
        p = p._subparsers._group_actions[0].choices[name]
    return p


def test_unknown_weight_fails_before_loading(tmp_path, capsys):
    missing = tmp_path / "missing.nii.gz"
    start = time.perf_counter()
    rc = main(["localize", str(missing), "--weights", "foo=1", "--quiet"])
    seconds = time.perf_counter() - start
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("vaeloc: error:") and err.count("\n") == 1
    assert "weights" in err and "foo" in err
    for name in ("rec_error_smooth", "kl_grad", *COMBINABLE_MAPS):
        assert name in err
    assert "missing.nii.gz" not in err  # the scan was never opened
    assert seconds < 1.0


def test_negative_smoothing_fails_before_loading(tmp_path, capsys):
    rc = main(["localize", str(tmp_path / "missing.nii.gz"), "--smoothing", "-1", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--smoothing must be >= 0" in err and "missing.nii.gz" not in err


def test_localize_help_lists_every_default_map_and_axis():
    text = _subparser("localize").format_help()
    for name in (*DEFAULT_MAPS, *AXIS_NAMES):
        assert re.search(rf"\b{name}\b", text), name


@pytest.mark.parametrize(
    "option",
    ["--overwrite", "--quiet", "--device", "--model", "--out", "--axis", "--seed", "--threads"],
)
def test_shared_options_are_defined_once(option):
    text = "".join(p.read_text(encoding="utf-8") for p in PACKAGE_SOURCES)
    assert text.count(f'"{option}"') == 1


@pytest.mark.parametrize(
    "command",
    [
        ("localize",),
        ("train",),
        ("demo",),
        ("evaluate", "fashion-mnist"),
        ("evaluate", "synthetic"),
        ("evaluate", "scans"),
        ("evaluate", "brain"),
    ],
)
def test_every_subcommand_has_overwrite_and_quiet(command):
    text = _subparser(*command).format_help()
    assert "--overwrite" in text and "--quiet" in text


def test_option_defaults_are_unchanged():
    parse = build_parser().parse_args
    lo = parse(["localize", "scan.nii"])  # the model follows the scan's modality
    assert (lo.model, lo.device, lo.out, lo.axis, lo.overwrite, lo.quiet, lo.threads) == (
        "auto",
        "auto",
        None,
        None,
        False,
        False,
        None,
    )
    tr = parse(["train", "icbm-t2", "--out", "m"])
    assert (tr.axis, tr.device, tr.seed, tr.threads) == ("axial", "auto", 0, None)
    de = parse(["demo"])  # the demo's model follows its sample (a raw T1 head: t1-brain)
    assert (de.out, de.model, de.device, de.sample) == (
        "vaeloc-demo", None, "auto", "t1-head-lesion"
    )  # fmt: skip
    assert parse(["prepare", "scan.nii"]).model == "auto"
    br = parse(["evaluate", "brain"])
    assert (br.out, br.model, br.cases, br.seed, br.maps) == ("results", "t2-brain", 50, 0, "all")
    with pytest.raises(SystemExit):
        parse(["localize", "scan.nii", "--axis", "oblique"])


def test_existing_output_refusal_gives_overwrite_advice(tmp_path, tiny_model_dir, capsys):
    scan = sample_path("t2-lesion")
    stem = scan.name[: -len(".nii.gz")]
    kept = tmp_path / f"{stem}_mask.nii.gz"
    kept.write_bytes(b"keep me")
    args = ["localize", str(scan), "--model", str(tiny_model_dir), "--out", str(tmp_path)]
    assert main([*args, "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaeloc: error:") and err.count("\n") == 1
    assert str(kept.name) in err
    assert err.rstrip().endswith("; pass --overwrite to replace")
    assert [p.name for p in tmp_path.iterdir()] == [kept.name]
    assert kept.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "argv",
    [["localize", "SCAN"], ["demo"], ["prepare", "SCAN"], ["evaluate", "individual"]],
    ids=lambda a: " ".join(a),
)
def test_commands_that_score_or_prepare_refuse_fewer_than_one_thread(argv, tmp_path, capsys):
    """--threads exists wherever torch runs (scoring, brain extraction); 0 is one line, before
    anything is read or written."""
    argv = [str(tmp_path / "scan.nii.gz") if a == "SCAN" else a for a in argv]
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out), "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "vaeloc: error: --threads must be 1 or more, not 0", err
    assert not out.exists()


def test_screen_has_one_thread_option():
    """A cohort's workers get their torch threads from --torch-threads; no second, ignored
    --threads beside it."""
    text = _subparser("screen").format_help()
    assert "--torch-threads" in text and "--threads " not in text
