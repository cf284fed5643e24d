"""Header geometry checked at load, through `vaeloc localize`: a broken sform, qform or pixdim
falls back (sform, qform, pixdim) with one note and the outputs carry the geometry used; units
other than mm are converted; what cannot be recovered is refused in one line.

Every file is real: written by nibabel, then its header fields patched on disk exactly as a
broken converter would have written them (nibabel itself would repair some on saving).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc.cli import main
from napari_vaeloc.io import load_volume

SFORM = np.array([[0.0, -1.5, 0.0, 4.0], [1.5, 0.0, 0.0, -6.0], [0.0, 0.0, 1.5, 8.0], [0, 0, 0, 1]])
QFORM = np.array([[0.0, -1.0, 0.0, 10], [1.0, 0.0, 0.0, -20], [0.0, 0.0, 2.0, 30], [0, 0, 0, 1]])
PIXDIM = np.diag([1.0, 1.0, 2.0, 1.0])  # the qform's voxel sizes, origin 0, no rotation
ZERO_ROW = np.zeros(4)


def _scan(folder: Path, name: str, **fields) -> Path:
    """A real 12x14x10 scan with a valid sform and qform, then ``fields`` written into its
    header on disk without any repair."""
    data = np.random.default_rng(0).random((12, 14, 10)).astype(np.float32) * 100
    img = nib.Nifti1Image(data, None)
    img.header.set_qform(QFORM, 1)
    img.header.set_sform(SFORM, 1)
    path = folder / f"{name}.nii"
    nib.save(img, path)
    with open(path, "rb") as fh:
        header = nib.Nifti1Header.from_fileobj(fh, check=False)
    for key, value in fields.items():
        header[key] = value
    raw = bytearray(path.read_bytes())
    raw[: header.sizeof_hdr] = header.binaryblock
    path.write_bytes(bytes(raw))
    return path


def _localize(scan: Path, model: Path, out: Path, capsys) -> tuple[int, list[str]]:
    argv = ["localize", str(scan), "--model", str(model), "--out", str(out), "--quiet"]
    rc = main([*argv, "--device", "cpu"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err.splitlines()


def _pixdim(*zooms: float) -> np.ndarray:
    return np.array([1.0, *zooms, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)


def _sform_col_k_zero() -> dict:
    cols = SFORM.copy()
    cols[:3, 2] = 0  # the slice direction
    return {"srow_x": cols[0], "srow_y": cols[1], "srow_z": cols[2]}


NAN_ROW = np.array([1.5, np.nan, 0.0, 0.0])

# name: (fields patched, affine the outputs must carry, the words of the one geometry note)
RECOVERED = {
    "sform_rows_zero": (
        {"srow_x": ZERO_ROW, "srow_y": ZERO_ROW, "srow_z": ZERO_ROW},
        QFORM,
        ["the sform (sform_code 1) is all zero: the qform was used instead"],
    ),
    "sform_slice_column_zero": (
        _sform_col_k_zero(),
        QFORM,
        ["the sform (sform_code 1) gives voxel axis k (slice) no direction (zero column)"],
    ),
    "sform_row_zero": (  # every voxel axis along x or z, none along y
        {"srow_x": [1.5, -1.5, 0, 4], "srow_y": ZERO_ROW},
        QFORM,
        ["the sform (sform_code 1) has its srow_y row all zero: the qform was used instead"],
    ),
    "sform_nan": ({"srow_y": NAN_ROW}, QFORM, ["sform", "NaN", "qform was used"]),
    "sform_inf": ({"srow_z": np.array([0, 0, np.inf, 0])}, QFORM, ["sform", "infinite"]),
    "qform_nan_quaternion": (
        {"sform_code": 0, "quatern_c": np.nan},
        PIXDIM,
        ["qform (qform_code 1)", "quatern", "pixdim"],
    ),
    "qform_garbage_quaternion": (
        {"sform_code": 0, "quatern_b": 5.0, "quatern_c": 7.0},
        PIXDIM,
        ["qform (qform_code 1)", "not a rotation", "pixdim"],
    ),
    "qform_inf_offset": (
        {"sform_code": 0, "qoffset_x": np.inf},
        PIXDIM,
        ["qform", "qoffset", "pixdim"],
    ),
    "sform_and_qform_broken": (
        {"srow_x": ZERO_ROW, "srow_y": ZERO_ROW, "srow_z": ZERO_ROW, "quatern_d": np.nan},
        PIXDIM,
        ["sform", "qform", "pixdim"],
    ),
    "pixdim_negative": ({"sform_code": 0, "pixdim": _pixdim(-1, 1, 2)}, QFORM, ["negative"]),
    "no_forms": ({"sform_code": 0, "qform_code": 0}, PIXDIM, ["no sform or qform", "pixdim"]),
}

# spatial units: an sform in metres or microns becomes 1 x 1 x 2 mm
UNITS = {
    "metres": ({"srow_x": [0.001, 0, 0, 0.01], "srow_y": [0, 0.001, 0, 0], "xyzt_units": 1 | 8}),
    "microns": ({"srow_x": [1000.0, 0, 0, 10000], "srow_y": [0, 1000.0, 0, 0], "xyzt_units": 3}),
}

REFUSED = {
    "pixdim_zero": ({"sform_code": 0, "pixdim": _pixdim(1, 1, 0)}, "pixdim"),
    "pixdim_nan": ({"sform_code": 0, "pixdim": _pixdim(1, np.nan, 2)}, "pixdim"),
    "nothing_usable": (
        {"srow_x": ZERO_ROW, "srow_y": ZERO_ROW, "srow_z": ZERO_ROW, "pixdim": _pixdim(0, 0, 0)},
        "pixdim",
    ),
}


@pytest.mark.parametrize("case", list(RECOVERED))
def test_broken_geometry_falls_back_with_one_note(tmp_path, tiny_model_dir, capsys, case):
    fields, want, words = RECOVERED[case]
    out = tmp_path / "out"
    rc, lines = _localize(_scan(tmp_path, case, **fields), tiny_model_dir, out, capsys)
    assert rc == 0, lines
    geometry = [ln for ln in lines if all(w in ln for w in words)]
    assert len(geometry) == 1, lines
    assert geometry[0].startswith("note: ")
    assert all(ln.startswith(("note: ", "warning: ")) for ln in lines), lines
    for kind in ("mask", "combined"):
        path = out / f"{case}_{kind}.nii.gz"
        img = nib.load(path)
        if want is PIXDIM:
            # no orientation in the scan, none in the outputs: read back as the scan was
            assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 0
            np.testing.assert_allclose(load_volume(path).affine, want, atol=1e-5)
            continue
        np.testing.assert_allclose(img.affine, want, atol=1e-5)
        np.testing.assert_allclose(img.header.get_sform(), want, atol=1e-5)
        np.testing.assert_allclose(img.header.get_qform(), want, atol=1e-5)
        assert img.header.get_xyzt_units()[0] == "mm"


def test_outputs_of_a_scan_without_orientation_lie_where_other_readers_put_the_scan(
    tmp_path, tiny_model_dir, capsys
):
    """A header with neither sform nor qform: readers disagree on where such a scan lies
    (nibabel centres it and flips x, ITK takes the voxel axes as L, P, S). The outputs' headers
    give no orientation either, so nibabel and SimpleITK put them exactly where they put the
    scan (an output written with the pixdim diagonal as its sform lay mirrored in both)."""
    import SimpleITK as sitk

    scan = _scan(tmp_path, "no_orientation", sform_code=0, qform_code=0)
    out = tmp_path / "out"
    rc, lines = _localize(scan, tiny_model_dir, out, capsys)
    assert rc == 0, lines
    given, given_itk = nib.load(scan), sitk.ReadImage(str(scan))
    for kind in ("mask", "combined"):
        path = out / f"no_orientation_{kind}.nii.gz"
        np.testing.assert_allclose(nib.load(path).affine, given.affine, atol=1e-5)
        written = sitk.ReadImage(str(path))
        np.testing.assert_allclose(written.GetDirection(), given_itk.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(written.GetOrigin(), given_itk.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(written.GetSpacing(), given_itk.GetSpacing(), atol=1e-6)


def test_bad_pixdim_beside_a_good_sform_is_not_needed(tmp_path, tiny_model_dir, capsys):
    scan = _scan(tmp_path, "nan_pixdim", pixdim=_pixdim(np.nan, 0, -3))
    rc, lines = _localize(scan, tiny_model_dir, tmp_path / "out", capsys)
    assert rc == 0
    assert not any("pixdim" in ln or "sform" in ln for ln in lines), lines
    img = nib.load(tmp_path / "out" / "nan_pixdim_mask.nii.gz")
    np.testing.assert_allclose(img.affine, SFORM, atol=1e-6)
    np.testing.assert_allclose(img.header.get_zooms(), [1.5, 1.5, 1.5])  # repaired


@pytest.mark.parametrize("unit", list(UNITS))
def test_units_other_than_mm_are_converted(tmp_path, tiny_model_dir, capsys, unit):
    fields = {**UNITS[unit], "srow_z": [0, 0, 2 * (0.001 if unit == "metres" else 1000.0), 0]}
    scan = _scan(tmp_path, unit, qform_code=0, **fields)
    rc, lines = _localize(scan, tiny_model_dir, tmp_path / "out", capsys)
    assert rc == 0
    assert sum(unit in ln and "converted to mm" in ln for ln in lines) == 1, lines
    img = nib.load(tmp_path / "out" / f"{unit}_mask.nii.gz")
    np.testing.assert_allclose(img.header.get_zooms(), [1.0, 1.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(img.affine[:3, 3], [10.0, 0.0, 0.0], rtol=1e-6)
    assert img.header.get_xyzt_units() == ("mm", "sec" if unit == "metres" else "unknown")


@pytest.mark.parametrize("case", list(REFUSED))
def test_unrecoverable_geometry_is_one_line(tmp_path, tiny_model_dir, capsys, case):
    fields, field = REFUSED[case]
    out = tmp_path / "out"
    rc, lines = _localize(_scan(tmp_path, case, **fields), tiny_model_dir, out, capsys)
    assert rc == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"vaeloc: error: {case}.nii has no usable voxel geometry")
    assert field in lines[0]
    assert not out.exists()  # a refused run leaves no folder behind
