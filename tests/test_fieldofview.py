"""Where a scan's field of view ends inside its grid, on the bundled real head and brains."""

from __future__ import annotations

import numpy as np
import pytest

from napari_vaeloc.fieldofview import PLANE_MIN_CM2, background_level, find_field_of_view
from napari_vaeloc.io import Volume, load_volume
from napari_vaeloc.prepare import looks_skull_stripped, near_cut_edge
from napari_vaeloc.samples import sample_path


def _cut(data: np.ndarray, spacing, normal, offset_mm: float) -> np.ndarray:
    """``data`` with every voxel beyond the plane ``normal . (index * spacing) > offset``
    set to 0 (a field of view cut there and zero-filled out to the grid)."""
    pos = (
        np.indices(data.shape).astype(np.float32)
        * np.asarray(spacing, np.float32)[:, None, None, None]
    )
    beyond = np.tensordot(np.asarray(normal, np.float32), pos, axes=1) > offset_mm
    return np.where(beyond, 0, data).astype(np.float32)


@pytest.fixture(scope="module")
def head() -> Volume:
    return load_volume(sample_path("t1-head"))


@pytest.fixture(scope="module")
def brain(head) -> Volume:
    mask = load_volume(sample_path("t1-head-brain-mask")).data > 0
    return Volume.from_array(np.where(mask, head.data, 0), head.affine)


def _angle(a, b) -> float:
    return float(np.degrees(np.arccos(np.clip(np.dot(a, b), -1, 1))))


def test_brains_have_no_end_of_the_field_of_view(brain):
    """A brain tapers to its ends: no flat face as large as a cut, on the real extracted brain
    and on the bundled template-space brains."""
    for vol in (brain, load_volume(sample_path("t1-healthy")),
                load_volume(sample_path("t2-lesion"))):  # fmt: skip
        view = find_field_of_view(vol.data, vol.spacing)
        assert view.planes == () and view.inside(vol.shape) is None, view.areas_cm2


@pytest.mark.parametrize("tilt", [0.0, 25.0])
def test_a_head_cut_and_zero_filled_ends_at_the_cut(head, tilt):
    """The real head cut halfway down, straight or tilted by 25 degrees, and filled out to its
    grid with zeros: the cut is found as a plane (normal within 5 degrees, offset within 3 mm),
    the field of view ends there, the head is not taken for a stripped brain, and a brain
    reaching the cut gets a band along it."""
    ax = int(np.argmax(np.abs(head.affine[2, :3])))  # inferior-superior voxel axis
    down = -np.sign(head.affine[2, ax])  # voxel index direction towards the feet
    normal = np.zeros(3)
    normal[ax] = down
    other = (ax + 1) % 3
    t = np.radians(tilt)
    normal = normal * np.cos(t)
    normal[other] = np.sin(t)
    centre = np.array(head.shape) * np.array(head.spacing) / 2
    offset = float(normal @ centre)
    data = _cut(head.data, head.spacing, normal, offset)
    cut = Volume.from_array(data, head.affine)
    view = find_field_of_view(cut.data, cut.spacing)
    matches = [(n, d) for n, d in view.planes if _angle(n, normal) < 5.0 and abs(d - offset) < 3.0]
    assert len(matches) == 1, (view.planes, normal, offset)
    i = view.planes.index(matches[0])
    assert view.areas_cm2[i] >= PLANE_MIN_CM2
    inside = view.inside(cut.shape)
    assert inside is not None
    pos = np.indices(cut.shape) * np.asarray(cut.spacing)[:, None, None, None]
    dist = np.tensordot(normal, pos, axes=1) - offset
    assert inside[dist < -3.0].all() and not inside[dist > 3.0].any()
    assert not looks_skull_stripped(cut, view)[0]
    # a brain mask up to the cut: a band along it, within 10 mm
    ball = (dist <= 0) & (np.linalg.norm(pos - centre[:, None, None, None], axis=0) < 50)
    band = near_cut_edge(ball, cut.spacing, in_view=inside)
    assert band is not None and not (band & ~ball).any()
    assert band[ball & (dist > -6.0)].all() and not band[dist < -12.0].any()


def test_a_cut_with_the_object_beyond_it_is_no_end(head):
    """A flat face with more of the object beyond it (here a flat cut into one side of the head,
    the rest kept) is no end of the field of view: only a plane with nothing beyond counts."""
    data = head.data.copy()
    ax = int(np.argmax(np.abs(head.affine[2, :3])))
    index = [slice(None)] * 3
    index[ax] = slice(head.shape[ax] // 2, head.shape[ax] // 2 + 1)
    data[tuple(index)] = 0  # one plane of zeros through the head: flat faces on both sides
    view = find_field_of_view(data, head.spacing)
    for n, _ in view.planes:
        assert _angle(np.abs(n), np.eye(3)[ax]) > 10.0, view.planes


def test_a_cut_that_fades_out_ends_where_the_fade_begins(head):
    """The real head faded out towards a cut over 4 mm (what a reslice that interpolated the
    cut leaves) and zero beyond: the field of view ends where the head reaches nine tenths
    of its intensity, not at the faint last voxel (2 mm further out); a hard cut keeps its
    last voxel, and so does the head's own surface where no cut is."""
    ax = int(np.argmax(np.abs(head.affine[2, :3])))
    normal = np.zeros(3)
    normal[ax] = -np.sign(head.affine[2, ax])
    pos = np.indices(head.shape) * np.asarray(head.spacing)[:, None, None, None]
    dist = np.tensordot(normal, pos, axes=1)
    offset = float(np.median(dist))
    fade = np.clip((offset - dist) / 4.0, 0.0, 1.0)  # 0 at the cut, whole 4 mm inside
    found = {}
    hard = np.where(dist > offset, 0, head.data)
    for name, data in (("faded", head.data * fade), ("hard", hard)):
        view = find_field_of_view(data.astype(np.float32), head.spacing)
        (d,) = [d for n, d in view.planes if _angle(n, normal) < 5.0]
        found[name] = d
    assert offset - 5.0 <= found["faded"] <= offset - 3.5, (found, offset)
    assert abs(found["hard"] - offset) <= 1.0, (found, offset)
    # the uncut head: its flat lateral face (air zeroed beyond it) ends at its last voxel
    view = find_field_of_view(head.data, head.spacing)
    assert view.planes, "the bundled head has a flat lateral face"
    data = head.data > background_level(head.data)
    for n, d in view.planes:
        along = np.tensordot(np.asarray(n), pos, axes=1)
        last = along[data & (np.abs(along - d) <= 4.0)].max()
        assert abs(d - last) <= 1e-3, (d, last)
