"""Volume I/O: geometry kept, atomic no-clobber writes, and every kind of bad input."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc.errors import InputError, OutputExistsError
from napari_vaeloc.io import (
    Volume,
    as_scorable_array,
    header_affine,
    load_image,
    load_volume,
    mask_like_note,
    save_nifti,
)
from tests.helpers import oblique_affine


def _write(path, data, affine=None, dtype=None):
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, path)
    return path


def test_roundtrip_keeps_affine_header_and_voxels(tmp_path, anatomical_path):
    vol = load_volume(anatomical_path)
    src = nib.load(anatomical_path)
    assert vol.shape == src.shape[:3]
    np.testing.assert_allclose(vol.affine, src.affine)
    rng = np.random.default_rng(0)
    m = rng.random(vol.shape).astype(np.float32)
    mask = (m > 0.7).astype(np.uint8)
    pm = save_nifti(m, vol, tmp_path / "map.nii.gz", "map")
    pk = save_nifti(mask, vol, tmp_path / "mask.nii", "mask")
    for p, want, dtype in ((pm, m, np.float32), (pk, mask, np.uint8)):
        img = nib.load(p)
        assert img.get_data_dtype().newbyteorder("=") == np.dtype(dtype)
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), want)
        np.testing.assert_allclose(img.affine, src.affine)
        for key in ("qform_code", "sform_code", "xyzt_units", "pixdim", "quatern_b", "srow_x"):
            np.testing.assert_array_equal(img.header[key], src.header[key])


def test_oblique_nifti2_roundtrip(tmp_path):
    aff = oblique_affine(1)
    data = np.random.default_rng(1).random((6, 7, 8)).astype(np.float32)
    nib.save(nib.Nifti2Image(data, aff), tmp_path / "in.nii")
    vol = load_volume(tmp_path / "in.nii")
    np.testing.assert_allclose(vol.spacing, [0.9, 1.3, 2.2], rtol=1e-6)
    out = save_nifti(vol.data * 2, vol, tmp_path / "out.nii.gz")
    img = nib.load(out)
    assert isinstance(img, nib.Nifti2Image)
    np.testing.assert_allclose(img.affine, aff, atol=1e-6)
    np.testing.assert_allclose(img.get_fdata(), data * 2, rtol=1e-6)


def test_refuses_to_overwrite_and_leaves_no_temp_files(tmp_path, phantom):
    target = tmp_path / "m.nii.gz"
    save_nifti(phantom.data, phantom, target)
    before = target.read_bytes()
    with pytest.raises(OutputExistsError, match="exists"):
        save_nifti(phantom.data * 0, phantom, target)
    assert target.read_bytes() == before
    save_nifti(phantom.data * 0, phantom, target, overwrite=True)
    assert nib.load(target).get_fdata().max() == 0
    assert sorted(os.listdir(tmp_path)) == ["m.nii.gz"]
    with pytest.raises(InputError, match="shape"):
        save_nifti(np.zeros((2, 2, 2)), phantom, tmp_path / "bad.nii.gz")
    assert sorted(os.listdir(tmp_path)) == ["m.nii.gz"]


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32, np.float64, np.float32])
def test_numeric_types_become_float32(tmp_path, dtype):
    data = (np.arange(60).reshape(3, 4, 5) % 7).astype(dtype)
    vol = load_volume(_write(tmp_path / "x.nii", data))
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data.astype(np.float32))
    assert vol.source_dtype == np.dtype(dtype).name


def test_2d_image_is_one_slice(tmp_path):
    data = np.random.default_rng(0).random((9, 11)).astype(np.float32)
    vol = load_volume(_write(tmp_path / "x.nii.gz", data))
    assert vol.shape == (9, 11, 1)
    assert Volume.from_array(data).shape == (9, 11, 1)
    out = nib.load(save_nifti(vol.data > 0.5, vol, tmp_path / "mask.nii.gz", "mask"))
    assert out.shape == (9, 11)  # written back as the 2D image it came from
    np.testing.assert_allclose(out.affine, nib.load(tmp_path / "x.nii.gz").affine, atol=1e-6)


def test_4d_needs_a_volume_index(example4d_path):
    with pytest.raises(InputError, match=r"4D with 2 volumes.*--volume-index"):
        load_volume(example4d_path)
    vol = load_volume(example4d_path, volume_index=1)
    src = nib.load(example4d_path)
    assert vol.shape == src.shape[:3]
    np.testing.assert_allclose(vol.data, src.dataobj[..., 1].astype(np.float32))
    assert any("volume 1 of 2" in n for n in vol.notes)
    with pytest.raises(InputError, match="out of range"):
        load_volume(example4d_path, volume_index=5)


def test_4d_with_one_volume_is_3d(tmp_path):
    data = np.random.default_rng(0).random((4, 5, 6, 1)).astype(np.float32)
    assert load_volume(_write(tmp_path / "x.nii", data)).shape == (4, 5, 6)


def test_5d_refused(tmp_path):
    data = np.ones((3, 3, 3, 2, 2), dtype=np.float32)
    with pytest.raises(InputError, match="5 dimensions"):
        load_volume(_write(tmp_path / "x.nii", data))


def test_nan_and_inf_become_background(tmp_path):
    data = np.random.default_rng(0).random((5, 5, 5)).astype(np.float32) + 1
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.nan, np.inf, -np.inf
    vol = load_volume(_write(tmp_path / "x.nii", data))
    assert np.isfinite(vol.data).all()
    assert (
        vol.data[0, 0, 0]
        == vol.data[1, 1, 1]
        == np.nanmin(np.where(np.isfinite(data), data, np.nan))
    )
    assert any("3 non-finite" in n for n in vol.notes)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.full((4, 4, 4), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.zeros((4, 4, 4), dtype=np.float32), "constant"),
        (np.full((4, 4, 4), 7, dtype=np.int16), "constant"),
        (np.zeros((0, 4, 4), dtype=np.float32), "empty"),
    ],
)
def test_unscorable_volumes_refused(tmp_path, data, message):
    with pytest.raises(InputError, match=message):
        Volume.from_array(data)
    if data.size:
        with pytest.raises(InputError, match=message):
            load_volume(_write(tmp_path / "x.nii", data))


def test_complex_refused():
    with pytest.raises(InputError, match="real numbers"):
        Volume.from_array(np.ones((3, 3, 3), dtype=np.complex64))


def test_corrupted_and_foreign_files(tmp_path, anatomical_path):
    gz = tmp_path / "cut.nii.gz"
    gz.write_bytes(gzip.compress(anatomical_path.read_bytes())[:5000])
    with pytest.raises(InputError, match=r"cut\.nii\.gz"):
        load_volume(gz)
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"this is not an image" * 30)
    with pytest.raises(InputError, match=r"cannot read junk\.nii"):
        load_volume(junk)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(InputError, match="not a NIfTI"):
        load_volume(txt)
    with pytest.raises(InputError, match="no such file"):
        load_volume(tmp_path / "missing.nii")
    with pytest.raises(InputError, match="folder"):
        load_volume(tmp_path)


def test_too_large_refused_before_loading(anatomical_path):
    with pytest.raises(InputError, match="crop or downsample"):
        load_volume(anatomical_path, max_bytes=1000)


def test_singular_affine_refused():
    with pytest.raises(InputError, match="singular"):
        Volume.from_array(np.random.default_rng(0).random((3, 3, 3)), affine=np.zeros((4, 4)))


def test_written_files_follow_the_umask(tmp_path, phantom):
    old = os.umask(0o022)
    try:
        p = save_nifti(phantom.data, phantom, tmp_path / "m.nii.gz")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


def test_one_atomic_writer_never_clobbers_and_names_the_paths(tmp_path):
    from napari_vaeloc.errors import OutputExistsError
    from napari_vaeloc.io import refuse_existing, write_folder_atomic, write_json_atomic

    target = tmp_path / "out" / "scores.json"
    write_json_atomic({"x": float("nan"), "y": np.float32(1.5)}, target)
    assert target.read_text() == '{\n  "x": null,\n  "y": 1.5\n}\n'
    with pytest.raises(OutputExistsError) as err:
        write_json_atomic({"x": 2}, target)
    assert err.value.paths == [target] and "--overwrite" not in str(err.value)
    assert "null" in target.read_text()  # untouched
    write_json_atomic({"x": 2}, target, overwrite=True)
    other = tmp_path / "out" / "b.nii.gz"
    other.write_bytes(b"")
    with pytest.raises(OutputExistsError, match="2 output files exist") as err:
        refuse_existing([target, other, tmp_path / "new.json"], False, "output file")
    assert err.value.paths == [target, other]

    def fail(folder):
        (folder / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder_atomic(tmp_path / "model", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-written folder
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.nii.gz", "scores.json"]


def test_check_output_folder_creates_probes_and_refuses_files(tmp_path):
    from napari_vaeloc.errors import OutputError
    from napari_vaeloc.io import check_output_folder

    new = tmp_path / "a" / "b"
    assert check_output_folder(new) == new
    assert list(tmp_path.iterdir()) == []  # probed, then the folders it made are gone again
    (tmp_path / "a").mkdir()
    assert check_output_folder(new) == new and list((tmp_path / "a").iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="it is a file, not a folder") as err:
        check_output_folder(blocker)
    assert err.value.path == blocker
    with pytest.raises(OutputError, match=f"{blocker} is a file, not a folder"):
        check_output_folder(blocker / "sub" / "deeper")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="broken link"):
        check_output_folder(tmp_path / "dangling")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "dangling", "file"]


def test_write_atomic_turns_os_errors_into_one_line(tmp_path, phantom):
    from napari_vaeloc.errors import OutputError
    from napari_vaeloc.io import refuse_existing, write_atomic, write_json_atomic

    folder = tmp_path / "m.nii.gz"
    folder.mkdir()
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="a folder of that name is in the way"):
            save_nifti(phantom.data, phantom, folder, overwrite=overwrite)
        with pytest.raises(OutputError, match="folder of that name"):
            refuse_existing([tmp_path / "new.json", folder], overwrite)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"cannot create the folder {blocker}: ") as err:
        write_json_atomic({}, blocker / "scores.json")
    assert "\n" not in str(err.value) and "Errno" not in str(err.value)

    def full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError) as err:
        write_atomic(tmp_path / "x.bin", full)
    assert str(err.value) == f"cannot write {tmp_path / 'x.bin'}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m.nii.gz"]  # no temp file


def test_load_volume_scorable_false_allows_a_constant_image(tmp_path):
    path = _write(tmp_path / "zero.nii.gz", np.zeros((4, 5, 6), dtype=np.int16))
    with pytest.raises(InputError, match="constant"):
        load_volume(path)
    vol = load_volume(path, scorable=False)
    assert vol.data.dtype == np.float32 and vol.shape == (4, 5, 6)
    assert not vol.data.any()


def test_load_image_keeps_every_volume(tmp_path, example4d_path):
    vol = load_image(example4d_path)
    src = nib.load(example4d_path)
    assert vol.shape == src.shape and vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, np.asanyarray(src.dataobj).astype(np.float32))
    data = np.full((3, 4, 5, 1), np.nan, dtype=np.float32)
    data[0] = 2.0
    flat = load_image(_write(tmp_path / "x.nii", data))
    assert flat.shape == (3, 4, 5) and (flat.data == 2.0).all()  # NaN -> minimum, constant ok
    flat2d = load_image(_write(tmp_path / "y.nii", np.ones((3, 4), dtype=np.uint8)))
    assert flat2d.shape == (3, 4, 1)


def test_mask_like_note():
    rng = np.random.default_rng(0)
    assert mask_like_note(rng.random((4, 4, 4))) is None
    assert "mask" in mask_like_note((rng.random((4, 4, 4)) > 0.5).astype(np.float32))
    assert "empty" in mask_like_note(np.zeros((2, 2, 2)))
    mask = (rng.random((6, 6, 6)) > 0.5) * 3
    assert "looks like a mask" in " ".join(Volume.from_array(mask).notes)


def test_a_tissue_label_image_gets_a_note_and_an_integer_scan_does_not():
    from napari_vaeloc.evaluation.synthetic import head_phantom

    head = head_phantom((70, 80, 60), seed=3)
    scan = np.round(head / head.max() * 1000).astype(np.int16)  # a scan stored as integers
    assert mask_like_note(scan) is None
    labels = np.digitize(head, np.array([0.1, 0.4, 0.7]) * head.max()).astype(np.uint8)
    note = mask_like_note(labels)
    assert note is not None and "label image" in note and "0, 1, 2, 3" in note
    assert "label image" in " ".join(Volume.from_array(labels).notes)
    assert mask_like_note(labels + 0.5) is None  # not whole numbers: not labels


def test_outputs_carry_the_geometry_used_and_a_mask_is_a_label_image(tmp_path):
    aff = oblique_affine(2)
    img = nib.Nifti1Image(np.random.default_rng(2).random((5, 6, 7)).astype(np.float32), None)
    img.header.set_qform(np.diag([3.0, 3.0, 3.0, 1.0]), 1)
    img.header.set_sform(aff, 1)
    img.header.set_intent("estimate")
    nib.save(img, tmp_path / "in.nii")
    vol = load_volume(tmp_path / "in.nii")
    mask = save_nifti(vol.data > 0.5, vol, tmp_path / "mask.nii.gz", "mask")
    heat = save_nifti(vol.data, vol, tmp_path / "map.nii.gz", "map")
    for path, intent in ((mask, "label"), (heat, "none")):
        hdr = nib.load(path).header
        assert hdr.get_intent()[0] == intent
        np.testing.assert_allclose(hdr.get_sform(), aff, atol=1e-6)
        np.testing.assert_allclose(hdr.get_qform(), hdr.get_sform(), atol=1e-5)  # no shear
        assert hdr.get_xyzt_units()[0] == "mm"


def test_a_float32_scan_is_shared_read_only_and_one_with_nan_is_copied(tmp_path):
    from napari_vaeloc.evaluation.synthetic import head_phantom

    data = head_phantom((20, 24, 18), seed=2).astype(np.float32)
    vol = Volume.from_array(data)
    assert np.shares_memory(vol.data, data) and not vol.data.flags.writeable
    assert data.flags.writeable  # the caller's array is left as it was
    with pytest.raises(ValueError):
        vol.data[0, 0, 0] = 1.0
    bad = data.copy()
    bad[0, 0, 0] = np.nan
    fixed = Volume.from_array(bad)
    assert not np.shares_memory(fixed.data, bad) and np.isnan(bad[0, 0, 0])
    assert fixed.data[0, 0, 0] == fixed.data.min()
    flipped = Volume.from_array(data[:, ::-1, :])  # negative strides: copied, contiguous
    assert not np.shares_memory(flipped.data, data) and flipped.data.flags.c_contiguous
    np.testing.assert_array_equal(flipped.data, data[:, ::-1, :])
    as_int = Volume.from_array((data * 1000).astype(np.int16))
    mapped = np.memmap(tmp_path / "raw.f4", np.float32, "w+", shape=data.shape)
    mapped[:] = data
    from_file = Volume.from_array(mapped)  # a file that may change: copied
    assert not np.shares_memory(from_file.data, mapped)
    assert as_int.data.dtype == np.float32 and as_int.data.flags.writeable


def test_gaps_enclosed_by_data_are_filled_from_around_them_and_background_gaps_are_not(tmp_path):
    """In a volume to score, a NaN gap inside the data reads as the tissue around it (a smooth
    ramp stays a ramp), not as the image's minimum; NaN reaching a face of the image (a
    background stored as NaN) is read as the minimum; both stay marked missing. A file read for
    viewing keeps the gap at the minimum; a viewer's layer scored with its missing voxels is
    filled like the file."""
    x = np.arange(40, dtype=np.float32)
    ramp = np.broadcast_to(100.0 + 2.0 * x[:, None, None], (40, 30, 20)).copy()
    data = ramp.copy()
    gap = (slice(15, 25), slice(10, 20), slice(6, 14))
    data[gap] = np.nan
    data[:, :, 0] = np.nan  # the bottom face: background
    path = tmp_path / "gap.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    vol = load_volume(path)
    arr, missing = vol.data, vol.missing
    assert missing is not None and missing.sum() == 10 * 10 * 8 + 40 * 30
    low = arr[~missing].min()
    assert np.all(arr[:, :, 0] == low)  # the background: the minimum
    # the gap: close to the ramp it interrupts (at most a few steps of it), far above the minimum
    assert np.abs(arr[gap] - ramp[gap]).max() < 10.0, np.abs(arr[gap] - ramp[gap]).max()
    assert np.array_equal(arr[~missing], ramp[~missing])  # the data is kept as it was
    # one note: how many, which were filled, what became of the rest
    [note] = [n for n in vol.notes if "non-finite" in n]
    assert note.startswith(f"{800 + 1200} non-finite voxels (NaN/Inf"), note
    assert note.endswith(
        ": the 800 enclosed by the scan's data filled from the voxels around them, the rest "
        f"read as the minimum {low:g} (background)"
    ), note
    # for viewing: as in the file, the gap at the minimum
    shown = load_image(path)
    assert np.all(shown.data[gap] == low) and np.array_equal(shown.missing, missing)
    # the viewer's layer (gap at the minimum) with the reader's missing voxels: filled alike
    again = Volume.from_array(shown.data, missing=shown.missing)
    np.testing.assert_allclose(again.data, arr)
    assert "800 voxels without data enclosed by the scan's data filled" in again.notes[-1]
    # only background NaN: read as the minimum, nothing filled
    data = ramp.copy()
    data[:3] = np.nan
    arr, notes, _, _ = as_scorable_array(data)
    assert np.all(arr[:3] == 106.0) and not any("filled" in n for n in notes), notes
    # a 2D image: the faces are its edges
    flat = ramp[:, :, 0].copy()
    flat[18:22, 10:14] = np.nan
    flat[0, :] = np.nan
    arr2, _, _, _ = as_scorable_array(flat)
    assert np.abs(arr2[18:22, 10:14, 0] - ramp[18:22, 10:14, 0]).max() < 6.0
    assert np.all(arr2[0, :, 0] == arr2.min())


def test_a_qform_of_a_half_turn_is_read_without_tilt(tmp_path):
    # a 180° turn about (1, 1, 0)/√2 stored in float32 leaves 1 - (b² + c² + d²) of about 6e-8:
    # without nifti1_io's special case the axes come out tilted by about 5e-4 rad
    half = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    aff = np.eye(4)
    aff[:3, :3] = half * 2.0
    aff[:3, 3] = [10.0, -20.0, 30.0]
    img = nib.Nifti1Image(np.zeros((4, 5, 6), dtype=np.float32), None)
    img.header.set_qform(aff, 1)
    img.header.set_sform(None, 0)
    hdr = img.header
    assert 0 < 1 - float(hdr["quatern_b"]) ** 2 - float(hdr["quatern_c"]) ** 2 < 1e-7
    got = header_affine(hdr, (4, 5, 6))[0]
    np.testing.assert_allclose(got, aff, atol=1e-6)
    np.testing.assert_allclose(got, hdr.get_qform(), atol=1e-6)
