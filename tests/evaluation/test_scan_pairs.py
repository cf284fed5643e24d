"""`vaeloc evaluate scans` end to end on the bundled samples, and finding scan/mask pairs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc.cli import main
from napari_vaeloc.errors import InputError
from napari_vaeloc.evaluation.plots import DPI, PANEL_INCH
from napari_vaeloc.evaluation.scan_pairs import find_pairs, iter_cases
from napari_vaeloc.io import load_volume
from napari_vaeloc.samples import sample_path

SHAPE = (96, 114, 96)  # the bundled samples


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _save(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def test_evaluate_scans_end_to_end(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(sample_path("t2-lesion"), scans / "case_a.nii.gz")
    shutil.copy(sample_path("t2-lesion-truth"), scans / "case_a_mask.nii.gz")
    shutil.copy(sample_path("t2-healthy"), scans / "case_b.nii.gz")
    out = tmp_path / "results"
    args = ["evaluate", "scans", str(scans), "--maps", "rec_error_smooth,kl_grad,default"]
    args += ["--out", str(out), "--device", "cpu", "--quiet", "--examples", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "case_b.nii.gz: no mask, counted as healthy" in printed
    assert "| all | default | foreground |" in printed

    positives = int((nib.load(scans / "case_a_mask.nii.gz").get_fdata() > 0).sum())
    rows = {(r["map"], r["region"]): r for r in _rows(out / "scans_t2-brain.csv")}
    assert set(rows) == {
        (m, r) for m in ("rec_error_smooth", "kl_grad", "default") for r in ("foreground", "image")
    }
    default = rows[("default", "foreground")]
    assert float(default["auroc"]) > 0.9
    assert 0 < float(default["dice_at_threshold"]) <= 1
    assert int(default["positives"]) == positives
    assert int(default["cases"]) == 2
    # the healthy scan's voxels are negatives: the image region is both volumes whole
    assert int(rows[("default", "image")]["voxels"]) == 2 * int(np.prod(SHAPE))
    assert int(default["voxels"]) < 2 * int(np.prod(SHAPE))
    samples = {(r["level"], r["score"]): r for r in _rows(out / "scans_t2-brain_samples.csv")}
    assert (
        samples[("volume", "elbo_mean")]["n"],
        samples[("volume", "elbo_mean")]["anomalous"],
    ) == (
        "2",
        "1",
    )
    assert 0 < int(samples[("slice", "kl")]["anomalous"]) < int(samples[("slice", "kl")]["n"])
    assert "| all | slice | kl |" in (out / "scans_t2-brain.md").read_text()

    # each scan's own mask: the lesion case's volumes in ml, the healthy case's marked voxels
    cases = {r["case"]: r for r in _rows(out / "scans_t2-brain_cases.csv")}
    assert set(cases) == {"case_a", "case_b"}
    a, b = cases["case_a"], cases["case_b"]
    assert a["setting"] == b["setting"] == "default"
    voxel_ml = float(np.prod(nib.load(scans / "case_a.nii.gz").header.get_zooms()[:3])) / 1000
    assert float(a["truth_ml"]) == pytest.approx(positives * voxel_ml, abs=5e-4)  # to the µl
    assert float(a["covered"]) > 0.5 and 0 < float(a["dice"]) <= 1
    assert float(a["mask_ml"]) > 0.5 * float(a["truth_ml"])
    assert float(b["truth_ml"]) == 0 and b["covered"] == "nan" and b["dice"] in ("nan", "0.0")
    # the pooled flagged fraction is the cases' marked normal voxels over all normal voxels
    assert 0 <= float(b["flagged"]) < 0.05
    assert {a["fit"], b["fit"]} <= {"ok", "warn"}
    md = (out / "scans_t2-brain.md").read_text()
    assert "| case_a | all | default |" in md and "| case_b | all | default | 0.00 |" in md

    for name in ("roc", "pr"):
        img = matplotlib.image.imread(out / f"scans_t2-brain_{name}.png")
        assert img.shape[:2] == (500, 550) and img.shape[2] in (3, 4)
        assert img[..., :3].std() > 0.05  # not blank
    panel = matplotlib.image.imread(out / "scans_t2-brain_examples.png")
    # two example rows (the lesion case, then the healthy one), image + truth + three maps
    px = PANEL_INCH * DPI
    assert panel.shape[:2] == (round(2 * px), round(5 * px))

    # a second run without --overwrite fails and leaves every file as it was
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_mask_of_the_wrong_shape_is_named(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(sample_path("t2-lesion"), scans / "case_a.nii.gz")
    _save(scans / "case_a_seg.nii.gz", np.zeros((96, 114, 95), np.uint8))
    out = tmp_path / "out"
    assert main(["evaluate", "scans", str(scans), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "case_a_seg.nii.gz has shape (96, 114, 95)" in err and "case_a.nii.gz" in err
    assert not out.exists()
    assert main(["evaluate", "scans", str(scans), "--maps", "kl,default", "--out", str(out)]) == 2
    assert "choose from rec_error" in capsys.readouterr().err


def test_a_folder_the_model_refuses_whole_is_one_line(tmp_path, capsys):
    """Every scan refused by the preparation: one line naming each with its reason, no files,
    and advice that this command takes."""
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(sample_path("t2-healthy"), scans / "t2.nii.gz")
    out = tmp_path / "out"
    args = ["evaluate", "scans", str(scans), "--model", "t1-brain", "--maps", "default"]
    assert main([*args, "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    said = capsys.readouterr()
    err = said.err
    assert said.out.startswith("1 scan, 0 with a mask\n")
    assert err.startswith("vaeloc: error: no cases to evaluate: t2: refused by the preparation")
    assert "not T1" in err and "(--model auto picks one)" in err
    assert err.count("\n") == 1 and not out.exists()


def test_model_auto_is_chosen_on_the_first_recognised_scan(tmp_path, capsys):
    """The default --model auto: a scan nothing is recognised in is passed over, the model is
    the one of the first scan whose modality is, that scan named; it scores every scan."""
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    _save(scans / "a_noise.nii.gz", rng.random((40, 48, 40)).astype(np.float32))
    shutil.copy(sample_path("t1-head"), scans / "b_head.nii.gz")
    out = tmp_path / "out"
    args = ["evaluate", "scans", str(scans), "--maps", "default", "--examples", "0"]
    assert main([*args, "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "model: t1-brain (b_head looks like T1, r = " in said
    assert (out / "scans_t1-brain_cases.csv").exists()
    assert "a_noise" in (out / "scans_t1-brain_cases.csv").read_text()


def test_model_auto_without_a_recognised_scan_is_one_line(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    _save(scans / "noise.nii.gz", rng.random((40, 48, 40)).astype(np.float32))
    out = tmp_path / "out"
    assert main(["evaluate", "scans", str(scans), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaeloc: error: --model auto: no scan's modality was recognised (noise:")
    assert err.count("\n") == 1 and not out.exists()


def test_pairs_by_suffix_and_by_folder(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    scan = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mask = np.zeros((2, 3, 4), np.int16)
    mask[1, 2, 3] = 7
    for name in ("a", "b", "c"):
        _save(d / f"{name}.nii.gz", scan)
    _save(d / "a_truth.nii.gz", mask)
    _save(d / "b_label.nii", mask)
    pairs = find_pairs(d)
    assert [(p.scan.name, p.mask.name if p.mask else None) for p in pairs] == [
        ("a.nii.gz", "a_truth.nii.gz"),
        ("b.nii.gz", "b_label.nii"),
        ("c.nii.gz", None),
    ]
    cases = iter_cases(pairs)
    first = next(cases)  # loaded lazily, one at a time
    assert first.truth.dtype == bool and first.truth.sum() == 1 and first.truth[1, 2, 3]
    assert first.info["name"] == "a" and not first.info["healthy"]
    assert [c.truth.sum() for c in cases] == [1, 0]

    masks = tmp_path / "masks"
    masks.mkdir()
    _save(masks / "c.nii.gz", mask)
    by_folder = find_pairs(d, masks)
    assert [p.mask.name if p.mask else None for p in by_folder] == [
        None,
        None,
        None,
        None,
        "c.nii.gz",
    ]  # in a scan folder the suffixed files are scans too

    _save(d / "a_seg.nii.gz", mask)
    with pytest.raises(InputError, match="a has two masks"):
        find_pairs(d)
    (d / "a_seg.nii.gz").unlink()
    _save(d / "zz_mask.nii.gz", mask)
    with pytest.raises(InputError, match=r"zz_mask\.nii\.gz is named like a mask"):
        find_pairs(d)


def test_folders_that_cannot_be_evaluated(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="is empty"):
        find_pairs(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("no scans here")
    with pytest.raises(InputError, match="no NIfTI files"):
        find_pairs(other)
    (other / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(InputError, match=r"broken\.nii\.gz"):
        find_pairs(other)
    with pytest.raises(InputError, match="no such folder"):
        find_pairs(tmp_path / "missing")


def test_raw_heads_are_prepared_before_they_are_judged(tmp_path, capsys):
    """A raw head with skull in its own voxel order is scored as `vaeloc localize` scores it
    (bias correction, brain extraction, registration): its lesion stands out. Scored as given
    (``--prepare none``, what the command did before it prepared scans), the same lesion is
    lost among the skull, the face and a template it does not lie in."""
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(sample_path("t1-head-lesion"), scans / "head.nii.gz")
    shutil.copy(sample_path("t1-head-lesion-truth"), scans / "head_mask.nii.gz")
    # a T2 brain in the folder: the T1 model's preparation refuses it, the head is still scored
    mixed = tmp_path / "mixed"
    shutil.copytree(scans, mixed)
    shutil.copy(sample_path("t2-healthy"), mixed / "other.nii.gz")
    # the head in 4 mm coronal slices (pairs of its 2 mm slices averaged): scored without the
    # coronal network, and its row says so
    head = load_volume(scans / "head.nii.gz")
    ap = int(np.argmax(np.abs(head.affine[1, :3])))  # the voxel axis along the world's A-P
    n = head.shape[ap] // 2 * 2
    shape = list(head.shape)
    shape[ap : ap + 1] = [n // 2, 2]
    affine = head.affine.copy()
    affine[:3, ap] *= 2
    slabs = np.take(head.data, np.arange(n), axis=ap).reshape(shape).mean(axis=ap + 1)
    nib.save(nib.Nifti1Image(slabs.astype(np.float32), affine), mixed / "thick.nii.gz")

    def default_row(folder: Path, *extra: str) -> tuple[dict, dict]:
        out = tmp_path / ("raw" if extra else "prepared")
        args = ["evaluate", "scans", str(folder), "--model", "t1-brain", "--maps", "default"]
        args += ["--out", str(out), "--device", "cpu", "--quiet", "--examples", "0", *extra]
        assert main(args) == 0
        rows = {(r["map"], r["region"]): r for r in _rows(out / "scans_t1-brain.csv")}
        cases = {r["case"]: r for r in _rows(out / "scans_t1-brain_cases.csv")}
        return rows[("default", "foreground")], cases

    prepared, cases = default_row(mixed)
    printed = capsys.readouterr().out
    as_given, given_cases = default_row(scans, "--prepare", "none")
    capsys.readouterr()
    assert float(prepared["auroc"]) > 0.95 and float(prepared["dice_at_threshold"]) > 0.6
    assert float(as_given["dice_at_threshold"]) < 0.3
    # judged inside the extracted brain on the scan's grid, not over the whole head
    head = int(np.prod(nib.load(scans / "head.nii.gz").shape))
    assert int(prepared["voxels"]) < head // 3
    # the refused scan is named with its failed check, counted nowhere, and the run goes on
    assert int(prepared["cases"]) == 2
    other = cases["other"]
    assert other["fit"] == "fail" and "modality: fail" in other["checks"]
    assert other["dice"] == "nan" and other["setting"] == ""
    assert "note: other: refused by the preparation" in printed
    assert cases["head"]["fit"] in ("ok", "warn") and float(cases["head"]["dice"]) > 0.6
    assert "scored:" not in cases["head"]["checks"]
    assert "scored: axial and sagittal slices fused" in cases["thick"]["checks"]
    assert "voxel size: warn" in cases["thick"]["checks"]
    assert given_cases["head"]["fit"] == "not prepared"
