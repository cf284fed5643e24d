"""World coordinates in napari: real NIfTI files in every voxel order and affine, opened and saved
through the plugin (npe2) in a real viewer; the first view; masks as Labels; 4D and constant
files; the widget's layer helpers on them."""

from __future__ import annotations

import napari
import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc._view import axial_view
from napari_vaeloc._widget_layers import geometry_of, n_volumes, put_layer, scan_inputs
from napari_vaeloc.io import Volume, save_nifti

#: napari draws an oblique scan's slice without its out-of-plane tilt, and says so
pytestmark = pytest.mark.filterwarnings("ignore:Non-orthogonal slicing:UserWarning")

SHAPE = (20, 24, 16)
LESION = (14, 6, 11)  # file voxel of the lesion
SPACING = (2.0, 1.5, 2.5)


def _rot(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(4)
    r[[i, i, j, j], [i, j, i, j]] = [np.cos(t), -np.sin(t), np.sin(t), np.cos(t)]
    return r


def _affine(code: str) -> np.ndarray:
    """Voxel-to-world affines (mm) of the voxel orders and geometries under test."""
    base = np.diag([*SPACING, 1.0])
    base[:3, 3] = (-20.0, -18.0, -20.0)
    if code == "RAS":
        return base
    if code == "LPS":
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ base
    if code == "LAS":
        return np.diag([-1.0, 1.0, 1.0, 1.0]) @ base
    if code == "permuted":  # file axes run along world y, z, x
        return np.eye(4)[[2, 0, 1, 3]] @ base
    if code == "oblique30":  # tilted 30 degrees about x, so the axial plane is oblique
        return _rot(0, 30.0) @ _rot(2, 10.0) @ base
    if code == "sheared":
        shear = np.eye(4)
        shear[0, 1], shear[1, 2] = 0.3, -0.2
        return shear @ base
    raise KeyError(code)


CODES = ["RAS", "LPS", "LAS", "permuted", "oblique30", "sheared"]


def _scan_data() -> np.ndarray:
    rng = np.random.default_rng(3)
    data = rng.normal(100.0, 5.0, SHAPE).astype(np.float32)
    data[LESION] = 400.0
    return data


def _write(path, data, affine, intent: str | None = None):
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    if intent:
        img.header.set_intent(intent)
    nib.save(img, path)
    return nib.load(path).affine  # as stored (float32 sform)


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.r_[np.asarray(ijk, dtype=float), 1.0])[:3]


def _open(viewer, path):
    return viewer.open(str(path), plugin="napari-vaeloc")


def _new_labels(viewer, layer):
    """napari's "new labels" button: scale, translate, rotate, shear, affine; no metadata."""
    viewer.layers.selection.active = layer
    viewer._new_labels()
    labels = viewer.layers[-1]
    assert "affine" not in labels.metadata
    return labels


@pytest.mark.parametrize("code", CODES)
def test_layer_world_is_nifti_world_and_painted_labels_land_there(
    code, make_napari_viewer, tmp_path
):
    path = tmp_path / f"{code}.nii.gz"
    affine = _write(path, _scan_data(), _affine(code))
    truth = _world(affine, LESION)
    half_voxel = 0.5 * min(SPACING)
    viewer = make_napari_viewer()
    [layer] = _open(viewer, path)
    [lesion] = np.argwhere(layer.data == 400.0)  # where napari holds it
    assert np.linalg.norm(np.asarray(layer.data_to_world(lesion)) - truth) < half_voxel
    assert layer.data_to_world(lesion) == pytest.approx(truth, abs=1e-3)

    labels = _new_labels(viewer, layer)
    labels.data[tuple(lesion)] = 1  # the user paints the voxel they see the lesion in
    out = tmp_path / f"{code}_painted.nii.gz"
    napari.save_layers(str(out), [labels], plugin="napari-vaeloc")
    back = nib.load(out)
    [painted] = np.argwhere(np.asarray(back.dataobj) > 0)
    assert np.linalg.norm(_world(back.affine, painted) - truth) < half_voxel


@pytest.mark.parametrize("code", ["LPS", "permuted", "oblique30"])
def test_saved_scan_keeps_file_order_affine_and_header(code, make_napari_viewer, tmp_path):
    path = tmp_path / f"{code}.nii.gz"
    data = _scan_data()
    affine = _write(path, data, _affine(code))
    viewer = make_napari_viewer()
    [layer] = _open(viewer, path)
    out = tmp_path / f"{code}_saved.nii.gz"
    napari.save_layers(str(out), [layer], plugin="napari-vaeloc")
    back = nib.load(out)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    np.testing.assert_allclose(back.affine, affine)


def test_writer_uses_full_transform_of_a_foreign_layer(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = np.zeros((6, 7, 8), np.uint8)
    data[4, 2, 5] = 1
    layer = viewer.add_labels(
        data, scale=(2.0, 1.0, 3.0), translate=(5.0, -4.0, 2.0), rotate=(30.0, 10.0, -5.0),
        shear=(0.2, -0.1, 0.3), affine=_rot(1, 15.0),
    )  # fmt: skip
    out = tmp_path / "foreign.nii"
    napari.save_layers(str(out), [layer], plugin="napari-vaeloc")
    back = nib.load(out)
    for ijk in ([4, 2, 5], [0, 0, 0], [5, 6, 7]):
        np.testing.assert_allclose(_world(back.affine, ijk), layer.data_to_world(ijk), atol=1e-4)


def _canvas_position(shot: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask(shot[..., :3].astype(int)))
    return np.array([rows.mean(), cols.mean()])


@pytest.mark.parametrize("code", ["RAS", "LPS", "permuted"])
def test_first_view_is_axial_anterior_up_radiological(code, make_napari_viewer, tmp_path):
    data = np.full(SHAPE, 1.0, np.float32)
    inv = np.linalg.inv(_affine(code))
    centre = _world(_affine(code), (np.array(SHAPE) - 1) / 2)

    def voxel(offset):  # the file voxel at a world offset (mm) from the centre
        return tuple(np.round(_world(inv, centre + offset)).astype(int))

    data[voxel([0, 12, 0])] = 5.0  # anterior
    data[voxel([12, 0, 0])] = 3.0  # the patient's right
    path = tmp_path / f"{code}_markers.nii.gz"
    _write(path, data, _affine(code))
    viewer = make_napari_viewer(show=True)
    [layer] = _open(viewer, path)
    assert viewer.dims.order == (2, 1, 0)
    assert viewer.dims.axis_labels == ("x", "y", "z")  # world axes, not -3, -2, -1
    layer.contrast_limits = (0.0, 5.0)
    layer.interpolation2d = "nearest"
    viewer.dims.set_point(2, centre[2])

    def positions():
        shot = viewer.screenshot(canvas_only=True, flash=False)
        return (
            _canvas_position(shot, lambda s: s[..., 0] > 240),  # 5: white
            _canvas_position(shot, lambda s: (s[..., 0] > 130) & (s[..., 0] < 180)),  # 3
            _canvas_position(shot, lambda s: (s[..., 0] > 30) & (s[..., 0] < 80)),  # body
        )

    anterior, right, body = positions()
    assert anterior[0] < body[0] - 10  # anterior up
    assert right[1] < body[1] - 10  # the patient's right on the screen's left
    axial_view(viewer, "neurological")
    anterior, right, body = positions()
    assert anterior[0] < body[0] - 10
    assert right[1] > body[1] + 10


def test_first_view_only_for_an_empty_viewer(make_napari_viewer, tmp_path):
    path = tmp_path / "scan.nii.gz"
    _write(path, _scan_data(), _affine("RAS"))
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((3, 4, 5)), name="already there")
    _open(viewer, path)
    assert viewer.dims.order == (0, 1, 2)
    assert viewer.dims.axis_labels == ("-3", "-2", "-1")  # napari's own: not this plugin's view
    with pytest.raises(ValueError, match="convention"):
        axial_view(viewer, "sideways")


def test_sample_opens_axially(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-vaeloc", "t1-head-lesion")  # LIA voxel order
    viewer.open_sample("napari-vaeloc", "t1-head-lesion-truth")
    scan, truth = viewer.layers
    assert viewer.dims.order == (2, 1, 0)
    assert truth.__class__.__name__ == "Labels"
    img = nib.load(scan.metadata["source_path"])
    ijk = np.argwhere(np.asarray(nib.load(truth.metadata["source_path"]).dataobj) > 0)[0]
    layer_ijk = np.asarray(ijk)[list(scan.metadata["voxel_axes"])]
    assert truth.data[tuple(layer_ijk)] == 1
    np.testing.assert_allclose(scan.data_to_world(layer_ijk), _world(img.affine, ijk), atol=1e-3)


def test_plugin_mask_reopens_as_labels(make_napari_viewer, tmp_path):
    scan = tmp_path / "scan.nii.gz"
    _write(scan, _scan_data(), _affine("LPS"))
    mask = np.zeros(SHAPE, np.uint8)
    mask[LESION] = 1
    like = Volume(_scan_data(), nib.load(scan).affine, nib.load(scan).header)
    written = save_nifti(mask, like, tmp_path / "mask.nii.gz", kind="mask")
    viewer = make_napari_viewer()
    [layer] = _open(viewer, written)
    assert layer.__class__.__name__ == "Labels"
    assert np.issubdtype(layer.data.dtype, np.integer)
    assert int(layer.data.sum()) == 1


@pytest.mark.parametrize(
    ("values", "dtype", "intent", "kind"),
    [
        ((0, 2, 7), np.float32, "label", "labels"),  # the NIfTI intent says labels
        ((0, 1), np.int16, None, "labels"),  # an integer 0/1 mask from another tool
        ((0, 1, 2, 900), np.int16, None, "image"),  # an integer scan
        ((0.0, 1.0), np.float32, None, "image"),  # float data without the intent
    ],
)
def test_labels_or_image(values, dtype, intent, kind, make_napari_viewer, tmp_path):
    data = np.zeros(SHAPE, dtype)
    for i, v in enumerate(values):
        data[i, :, :] = v
    path = tmp_path / "file.nii.gz"
    _write(path, data, _affine("RAS"), intent)
    viewer = make_napari_viewer()
    [layer] = _open(viewer, path)
    assert layer.__class__.__name__.lower() == kind
    np.testing.assert_array_equal(np.unique(layer.data), np.unique(data))


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_constant_file_opens_and_displays(value, make_napari_viewer, tmp_path):
    path = tmp_path / "constant.nii.gz"
    _write(path, np.full(SHAPE, value, np.float32), _affine("RAS"))
    viewer = make_napari_viewer()
    [layer] = _open(viewer, path)
    assert layer.__class__.__name__ == "Image"
    assert np.all(layer.data == value)
    lo, hi = layer.contrast_limits
    assert lo == value and hi > lo
    assert viewer.screenshot(canvas_only=True, flash=False).shape[-1] == 4


def test_4d_file_opens_volume_axis_first(make_napari_viewer, tmp_path):
    data = np.stack([_scan_data() + 10 * t for t in range(3)], axis=-1)  # (X, Y, Z, T)
    path = tmp_path / "series.nii.gz"
    affine = _write(path, data, _affine("LPS"))
    viewer = make_napari_viewer()
    [layer] = _open(viewer, path)
    assert layer.data.shape == (3, *SHAPE)
    assert layer.metadata["volume_axis"] == 0 and layer.metadata["n_volumes"] == 3
    np.testing.assert_array_equal(layer.data[2], data[..., 2])
    assert np.asarray(layer.affine.affine_matrix).shape == (5, 5)
    world = layer.data_to_world((2, *LESION))
    assert world[0] == pytest.approx(2.0)
    np.testing.assert_allclose(world[1:], _world(affine, LESION), atol=1e-3)
    assert viewer.dims.order == (0, 3, 2, 1)
    assert viewer.dims.axis_labels == ("volume", "x", "y", "z")
    viewer.add_image(np.zeros((2, 3, *SHAPE)), name="5D, another plugin's")
    assert viewer.dims.axis_labels[1:] == ("volume", "x", "y", "z")  # kept under a new axis
    assert n_volumes(layer) == 3
    out = tmp_path / "series_saved.nii.gz"
    napari.save_layers(str(out), [layer], plugin="napari-vaeloc")
    back = nib.load(out)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    np.testing.assert_allclose(back.affine, affine)


def test_4d_layer_gives_one_volume_and_3d_result_layers(make_napari_viewer, tmp_path):
    data = np.stack([_scan_data() + 10 * t for t in range(3)], axis=-1)
    data = np.transpose(data, (1, 2, 0, 3))  # file axes along world y, z, x
    path = tmp_path / "series.nii.gz"
    affine = _write(path, data, np.eye(4)[[2, 0, 1, 3]] @ _affine("RAS"))
    viewer = make_napari_viewer()
    [layer] = _open(viewer, path)
    inputs = scan_inputs(layer, 1)
    np.testing.assert_array_equal(inputs["data"], data[..., 1])  # the file's voxel order
    np.testing.assert_allclose(inputs["affine"], affine)
    for bad in (None, 3, -1):
        with pytest.raises(ValueError, match=r"holds 3 volumes: choose one, 0 to 2"):
            scan_inputs(layer, bad)
    mask = (inputs["data"] > 300).astype(np.uint8)  # a result on the file's grid
    result = put_layer(viewer, "labels", "result", mask, layer, "mask")
    assert result.ndim == 3 and "volume_axis" not in result.metadata
    [hit] = np.argwhere(result.data > 0)
    file_lesion = np.argwhere(data[..., 1] == 410.0)[0]
    np.testing.assert_allclose(result.data_to_world(hit), _world(affine, file_lesion), atol=1e-3)
    assert len(geometry_of(layer)["scale"]) == 3


@pytest.mark.parametrize("code", ["LPS", "permuted", "oblique30"])
def test_scan_inputs_and_result_layers_line_up(code, make_napari_viewer, tmp_path):
    path = tmp_path / f"{code}.nii.gz"
    data = _scan_data()
    affine = _write(path, data, _affine(code))
    viewer = make_napari_viewer()
    [layer] = _open(viewer, path)
    inputs = scan_inputs(layer)
    np.testing.assert_array_equal(inputs["data"], data)
    np.testing.assert_allclose(inputs["affine"], affine)
    assert n_volumes(layer) == 1
    result = put_layer(viewer, "image", "map", inputs["data"] * 2, layer, "combined")
    [hit] = np.argwhere(result.data == 800.0)
    np.testing.assert_allclose(result.data_to_world(hit), _world(affine, LESION), atol=1e-3)
    out = tmp_path / "map.nii.gz"
    napari.save_layers(str(out), [result], plugin="napari-vaeloc")
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), data * 2)


@pytest.mark.parametrize("swap", [False, True])
def test_2d_file_is_a_2d_layer_with_its_affine(swap, make_napari_viewer, tmp_path):
    affine = _affine("LPS")
    affine[0, 1] = 0.4
    if swap:  # file axis 0 runs along world y, axis 1 along x
        affine = np.eye(4)[[1, 0, 2, 3]] @ affine
    data = _scan_data()[:, :, :1]
    data[LESION[0], LESION[1], 0] = 400.0
    path = tmp_path / "slice.nii.gz"
    affine = _write(path, data, affine)
    viewer = make_napari_viewer()
    [layer] = _open(viewer, path)
    assert layer.data.shape == ((SHAPE[1], SHAPE[0]) if swap else SHAPE[:2])
    assert np.asarray(layer.affine.affine_matrix).shape == (3, 3)
    [ij] = np.argwhere(layer.data == 400.0)
    assert layer.data_to_world(ij) == pytest.approx(_world(affine, (*LESION[:2], 0))[:2], abs=1e-3)
    assert viewer.dims.order == (1, 0)
    assert viewer.dims.axis_labels == ("x", "y")
    out = tmp_path / "slice_saved.nii"
    napari.save_layers(str(out), [layer], plugin="napari-vaeloc")
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), data)
