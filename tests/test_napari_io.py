"""napari reader, writers, sample data and manifest: real files, real viewer."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from napari.utils.notifications import notification_manager

from napari_vaeloc._reader import napari_get_reader
from napari_vaeloc.io import load_volume
from napari_vaeloc.samples import sample_path

#: napari draws an oblique scan's slice without its out-of-plane tilt, and says so
pytestmark = pytest.mark.filterwarnings("ignore:Non-orthogonal slicing:UserWarning")


def _oblique_nifti(path: Path) -> nib.Nifti1Image:
    rng = np.random.default_rng(0)
    aff = np.array(
        [[0, -1.5, 0, 90.0], [1.2, 0, 0.1, -40.0], [0, 0.2, 2.5, 12.0], [0, 0, 0, 1]],
    )
    img = nib.Nifti1Image(rng.random((9, 8, 7)).astype(np.float32), aff)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"oblique test scan"
    nib.save(img, path)
    return nib.load(path)  # the affine as stored (float32 sform)


def test_manifest_is_valid():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    mf = pm.get_manifest("napari-vaeloc")
    assert {w.display_name for w in mf.contributions.widgets} == {"Localize anomalies"}
    assert {s.key for s in mf.contributions.sample_data} >= {"t2-lesion", "t2-healthy"}
    assert {tuple(w.layer_types) for w in mf.contributions.writers} == {("labels",), ("image",)}


def test_reader_ignores_foreign_files(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    assert napari_get_reader(str(txt)) is None
    assert napari_get_reader([str(txt), str(sample_path("t2-lesion"))]) is None
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader(str(tmp_path / "missing.nii.gz")) is not None  # by name only


def test_reader_layer_geometry(tmp_path):
    """The file's axes are shown in world order (x, y, z); data-to-world is the file's affine."""
    path = tmp_path / "oblique.nii.gz"
    img = _oblique_nifti(path)  # file axis 0 runs along world y, axis 1 along x
    data, kwargs, kind = napari_get_reader(str(path))(str(path))[0]
    assert kind == "image"
    assert kwargs["metadata"]["voxel_axes"] == (1, 0, 2)
    np.testing.assert_array_equal(data, img.get_fdata(dtype=np.float32).transpose(1, 0, 2))
    vol = load_volume(path)
    np.testing.assert_allclose(kwargs["scale"], np.asarray(vol.spacing)[[1, 0, 2]])
    layer_to_world = np.asarray(kwargs["affine"]) @ np.diag([*kwargs["scale"], 1.0])
    np.testing.assert_allclose(layer_to_world, img.affine[:, [1, 0, 2, 3]], atol=1e-6)
    assert kwargs["units"] == ("mm", "mm", "mm")
    np.testing.assert_array_equal(kwargs["metadata"]["affine"], img.affine)
    assert kwargs["metadata"]["header"]["descrip"] == b"oblique test scan"
    assert kwargs["metadata"]["source_shape"] == (9, 8, 7)


def test_open_and_save_roundtrip_through_viewer(make_napari_viewer, tmp_path):
    """File > Open and File > Save Selected Layers keep voxels, affine and header."""
    src = tmp_path / "oblique.nii.gz"
    img = _oblique_nifti(src)
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(src), plugin="napari-vaeloc")
    assert layer.units[0] == "millimeter"
    out = tmp_path / "saved_image.nii.gz"
    viewer.layers.save(str(out), selected=False, plugin="napari-vaeloc")
    back = nib.load(out)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(img.dataobj))
    np.testing.assert_allclose(back.affine, img.affine)
    assert back.header["descrip"] == b"oblique test scan"

    labels = viewer.add_labels((layer.data > 0.5).astype(np.uint8), name="m", **_geom(layer))
    mask_out = tmp_path / "mask.nii.gz"
    viewer.layers.selection = {labels}
    written = viewer.layers.save(str(mask_out), selected=True, plugin="napari-vaeloc")
    assert written == [str(mask_out)]
    m = nib.load(mask_out)
    assert m.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(m.dataobj), np.asarray(img.dataobj) > 0.5)
    np.testing.assert_allclose(m.affine, img.affine)


def _geom(layer):
    return {"scale": layer.scale, "affine": layer.affine, "metadata": dict(layer.metadata)}


def test_writer_falls_back_to_scale_translate(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = np.zeros((5, 6, 7), dtype=np.uint8)
    data[1:3, 2:4, 3:6] = 2
    viewer.add_labels(data, name="plain", scale=(2.0, 3.0, 4.0), translate=(10.0, -5.0, 1.0))
    out = tmp_path / "plain.nii"
    viewer.layers.save(str(out), selected=False, plugin="napari-vaeloc")
    back = nib.load(out)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    expected = np.diag([2.0, 3.0, 4.0, 1.0])
    expected[:3, 3] = (10.0, -5.0, 1.0)
    np.testing.assert_allclose(back.affine, expected)


def test_corrupted_file_gives_notification(make_napari_viewer, tmp_path):
    good = sample_path("t2-lesion").read_bytes()
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(good[: len(good) // 3])  # truncated gzip stream
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    viewer = make_napari_viewer()
    before = len(notification_manager.records)
    for p in (bad, junk):
        layers = viewer.open(str(p), plugin="napari-vaeloc")
        assert layers == []
    new = [str(n.message) for n in notification_manager.records[before:]]
    assert any("broken.nii.gz" in m for m in new), new
    assert any("junk.nii.gz" in m for m in new), new
    assert len(viewer.layers) == 0


def test_sample_data_through_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-vaeloc", "t2-lesion")
    viewer.open_sample("napari-vaeloc", "t2-lesion-truth")
    scan, truth = viewer.layers
    vol = load_volume(sample_path("t2-lesion"))
    assert scan.data.shape == vol.shape == truth.data.shape
    np.testing.assert_allclose(scan.scale, vol.spacing)
    np.testing.assert_allclose(scan.data_to_world((0, 0, 0)), vol.origin)
    assert type(truth).__name__ == "Labels"
    assert truth.data.max() == 1 and truth.data.sum() > 0
    viewer.open_sample("napari-vaeloc", "t1-head")  # the healthy raw head, on its own grid
    head, head_vol = viewer.layers[-1], load_volume(sample_path("t1-head"))
    assert head.name == "t1-head" and head.data.shape == head_vol.shape
    np.testing.assert_allclose(head.data_to_world((0, 0, 0)), head_vol.origin)
