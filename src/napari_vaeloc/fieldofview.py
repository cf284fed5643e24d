"""Where a scan's field of view ends inside its grid.

A scanner's field of view ends at the faces of the image it writes. Resliced into a larger or
rotated box (a conform step, a reorientation with resampling, a registration to a standard
grid), a scan that cut the head short keeps that cut inside the grid: the object stops at a
flat face, and beyond it there is only the background value the reslice filled in. Such a face
is found here as a plane; the field of view is the image on the near side of every such plane.
The preparation uses it to judge the skull (a head cut short and filled out can be brain-sized
and flat around), to leave no brain beyond it, to measure the coverage and to leave out the
brain along the cut (:func:`napari_vaeloc.prepare.near_cut_edge`).

How a face is found: the object (the voxels above the scan's minimum, holes filled) on a grid of
about :data:`PLANE_GRID_MM`; its surface voxels with their outward normals (the gradient of the
smoothed object); the largest group that shares a normal (to about 14 degrees) and an offset
along it (to :data:`OFFSET_BIN_MM`); a plane fitted to that group by least squares (the
normal is the direction of least spread) and its inliers gathered again. A plane counts as an
end of the field of view when at least :data:`PLANE_MIN_CM2` of surface lies on it and at most
:data:`BEYOND_MAX` of the object beyond it. It is then placed on the scan's own voxels: at the
last voxel with data, moved in by the width of a fade that an interpolating reslice leaves
(:func:`_fade_mm`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

#: the least area (cm²) of one flat face of the object that counts as an end of the field of
#: view. A brain's largest flat face (the brainstem where an extraction ends) is 5-6 cm² on
#: the bundled samples and a real extracted 1 mm brain; a real head cut and zero-filled
#: anywhere from its top 45 % to its top 75 %, straight or tilted by 20-27 degrees, 88-202 cm²
#: (measured)
PLANE_MIN_CM2 = 25.0
#: the grid spacing (mm) the faces are looked for on (the scan's voxels, every n-th)
PLANE_GRID_MM = 2.0
#: the width (mm) of the offset bins surface voxels are grouped in
OFFSET_BIN_MM = 4.0
#: how far (mm) a surface voxel may lie off a fitted plane and still be on it
PLANE_TOLERANCE_MM = 2.0
#: the most of the object (share of its voxels) that may lie beyond a plane for it to be an end
BEYOND_MAX = 0.01
#: the most planes looked for
MAX_PLANES = 6


@dataclass(frozen=True)
class FieldOfView:
    """The part of a grid the scan's field of view covers.

    Attributes:
        spacing: (3,) voxel sides in mm of the grid.
        planes: the ends of the field of view inside the grid, each (outward unit normal (3,),
            offset in mm) in the grid's voxel frame scaled to mm (a voxel's position is
            ``index * spacing``): the field of view is where ``normal . position <= offset``
            for every plane. Empty: the whole image.
        areas_cm2: the surface (cm²) found on each plane.
    """

    spacing: tuple[float, float, float]
    planes: tuple[tuple[tuple[float, float, float], float], ...] = ()
    areas_cm2: tuple[float, ...] = ()

    def inside(self, shape: tuple[int, ...], margin_mm: float = 0.0) -> np.ndarray | None:
        """uint8 (X, Y, Z), 1 in the field of view, 0 beyond one of :attr:`planes` or within
        ``margin_mm`` of one; None without planes (the whole image). Computed a plane of
        voxels at a time (no float array of the scan's size)."""
        if not self.planes:
            return None
        out = np.ones(tuple(int(n) for n in shape[:3]), np.uint8)
        half = 0.5 * max(self.spacing)  # a voxel whose centre lies on the plane is in view
        for normal, offset in self.planes:
            for i, proj in _along(out.shape, self.spacing, normal):
                out[i][proj > offset + half - margin_mm] = 0
        return out


def _along(
    shape: tuple[int, ...], spacing: Sequence[float], normal: Sequence[float]
) -> Iterator[tuple[int, np.ndarray]]:
    """(i, float32 (Y, Z)): ``normal . position`` (mm) of the voxels of each plane ``i`` along
    the first axis, a plane at a time (no float array of the scan's size)."""
    n = np.asarray(normal, np.float32)
    y = (np.arange(shape[1], dtype=np.float32) * np.float32(spacing[1]))[:, None]
    z = (np.arange(shape[2], dtype=np.float32) * np.float32(spacing[2]))[None, :]
    yz = n[1] * y + n[2] * z  # (Y, Z) for x = 0
    for i in range(shape[0]):
        yield i, yz + n[0] * np.float32(i * spacing[0])


def background_level(data: np.ndarray) -> float:
    """The level at or below which a voxel is the flat background a skull-stripped or
    zero-filled scan has: the scan's minimum plus a millionth of its range."""
    low = float(np.min(data))
    return low + 1e-6 * (float(np.max(data)) - low)


def find_field_of_view(data: np.ndarray, spacing: tuple[float, ...]) -> FieldOfView:
    """The field of view of a scan inside its grid (module docstring: how the faces are found).

    Args:
        data: (X, Y, Z) intensities (any real dtype).
        spacing: (3,) voxel sides in mm.

    Returns:
        A :class:`FieldOfView` whose planes are the object's flat faces with only background
        beyond: none for a whole head, a brain, or a scan cut at the faces of its image.
    """
    from scipy import ndimage

    from .preprocess import fill_holes

    sp = np.asarray(spacing[:3], np.float64)
    step = np.maximum(1, np.round(PLANE_GRID_MM / sp)).astype(int)
    thr = background_level(data)
    coarse = np.asarray(data[:: step[0], :: step[1], :: step[2]])
    obj = fill_holes(coarse > thr)
    spacing_mm = (float(sp[0]), float(sp[1]), float(sp[2]))
    if obj.sum() < 8:
        return FieldOfView(spacing_mm)
    grid = sp * step  # mm between the coarse voxels
    # the surface away from the image's faces (a face of the image ends the view anyway)
    surface = obj & ~ndimage.binary_erosion(obj, border_value=1)
    smooth = ndimage.gaussian_filter(obj.astype(np.float32), 1.0)
    where = np.nonzero(surface)
    grad = np.stack([ndimage.sobel(smooth, axis=a)[where] / grid[a] for a in range(3)])
    normals = -grad / np.maximum(np.linalg.norm(grad, axis=0), 1e-12)
    points = np.stack(where).astype(np.float64) * grid[:, None]  # (3, n) mm
    voxel_cm2 = float(np.prod(grid)) ** (2.0 / 3.0) / 100.0
    obj_points = np.stack(np.nonzero(obj)).astype(np.float64) * grid[:, None]
    n_obj = obj_points.shape[1]

    pool = np.ones(points.shape[1], bool)
    planes, areas = [], []
    for _ in range(MAX_PLANES):
        group = _largest_group(normals, points, pool)
        if group is None or group.sum() * voxel_cm2 < PLANE_MIN_CM2:
            break
        normal, offset, on = _fit_plane(normals, points, pool, group)
        area = float(on.sum()) * voxel_cm2
        beyond = np.count_nonzero(normal @ obj_points > offset + PLANE_TOLERANCE_MM)
        pool &= ~(on | group)
        if area >= PLANE_MIN_CM2 and beyond <= BEYOND_MAX * n_obj:
            # on the scan's own voxels: the last voxel with data along the normal near it
            offset = _last_data(data, thr, sp, normal, offset, 2.0 * float(grid.max()))
            offset -= _fade_mm(data, thr, sp, normal, offset)
            planes.append((tuple(float(v) for v in normal), float(offset)))
            areas.append(round(area, 1))
    return FieldOfView(spacing_mm, tuple(planes), tuple(areas))


def _last_data(
    data: np.ndarray, thr: float, sp: np.ndarray, normal: np.ndarray, offset: float, reach: float
) -> float:
    """The largest ``normal . position`` (mm) of the scan's voxels above ``thr`` within
    ``reach`` mm of the plane at ``offset`` (the coarse grid's estimate): where the data end
    along the normal, read a plane of voxels at a time."""
    best = -np.inf
    for i, proj in _along(data.shape, sp, normal):
        near = (np.abs(proj - offset) <= reach) & (data[i] > thr)
        if near.any():
            best = max(best, float(proj[near].max()))
    return offset if best == -np.inf else best


#: a reslice that interpolated the cut leaves the object fading out towards it over a few
#: voxels: the field of view ends where the object's median intensity along the plane first
#: reaches this share of its median :data:`FADE_REFERENCE_MM` further in
FADE_LEVEL = 0.9
#: the band (mm from the last data) whose median intensity is the reference for the fade
FADE_REFERENCE_MM = (8.0, 14.0)
#: the widest fade (mm) taken off the field of view: a reslice's ramp is a voxel or a few wide;
#: an object that reaches its level only further in ends with its own surface (a head's scalp
#: and skull, darker than what lies inside), and keeps its last voxel
FADE_MAX_MM = 4.0


def _fade_mm(
    data: np.ndarray, thr: float, sp: np.ndarray, normal: np.ndarray, offset: float
) -> float:
    """How far (mm) inside the last data at ``offset`` along ``normal`` the object fades out:
    the depth at which the median intensity of the voxels above ``thr``, per depth bin of
    the finest voxel side, first reaches :data:`FADE_LEVEL` of the median at
    :data:`FADE_REFERENCE_MM`; 0 for a hard edge, and for an object that fades over more than
    :data:`FADE_MAX_MM` (its own surface)."""
    step = float(min(sp))
    far = FADE_REFERENCE_MM[1]
    depths, values = [], []
    for i, proj in _along(data.shape, sp, normal):
        depth = offset - proj
        near = (depth >= 0) & (depth < far) & (data[i] > thr)
        if near.any():
            depths.append(depth[near])
            values.append(np.asarray(data[i][near], np.float32))
    if not depths:
        return 0.0
    depth, value = np.concatenate(depths), np.concatenate(values)
    reference = value[(depth >= FADE_REFERENCE_MM[0]) & (depth < far)]
    if reference.size == 0:
        return 0.0
    level = FADE_LEVEL * float(np.median(reference))
    bins = np.floor(depth / step).astype(np.int64)
    for b in range(int(np.ceil(FADE_MAX_MM / step)) + 1):
        here = value[bins == b]
        if here.size and float(np.median(here)) >= level:
            return b * step
    return 0.0  # no short fade: the object's own surface (a scalp), not a reslice's ramp


def _largest_group(normals: np.ndarray, points: np.ndarray, pool: np.ndarray) -> np.ndarray | None:
    """bool (n,): the surface voxels in ``pool`` of the most common (normal, offset) bin:
    normals rounded to quarters per component, offsets along the rounded normal binned by
    :data:`OFFSET_BIN_MM`; None when the pool is empty."""
    idx = np.flatnonzero(pool)
    if idx.size == 0:
        return None
    q = np.round(normals[:, idx] * 4).astype(np.int64)
    unit = q / np.maximum(np.linalg.norm(q, axis=0), 1e-12)
    offset = np.floor((unit * points[:, idx]).sum(0) / OFFSET_BIN_MM).astype(np.int64)
    key = ((q[0] + 4) * 9 + (q[1] + 4)) * 9 + (q[2] + 4)
    key = key * (1 << 32) + (offset - offset.min())
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    group = np.zeros(pool.shape, bool)
    group[idx[inverse == counts.argmax()]] = True
    return group


def _fit_plane(
    normals: np.ndarray, points: np.ndarray, pool: np.ndarray, group: np.ndarray
) -> tuple[np.ndarray, float, np.ndarray]:
    """(unit outward normal, offset mm, inliers): the least-squares plane of ``group`` (normal:
    the direction of least spread, turned outward), refitted once on the pool's surface voxels
    within :data:`PLANE_TOLERANCE_MM` of it whose normals lie within 25 degrees of it."""
    chosen = group
    normal, offset = np.zeros(3), 0.0
    for _ in range(2):
        p = points[:, chosen]
        centre = p.mean(1)
        _, _, vt = np.linalg.svd((p - centre[:, None]).T, full_matrices=False)
        normal = vt[-1]
        if normal @ normals[:, chosen].mean(1) < 0:
            normal = -normal
        offset = float(normal @ centre)
        near = np.abs(normal @ points - offset) <= PLANE_TOLERANCE_MM
        chosen = pool & near & (normal @ normals >= np.cos(np.radians(25.0)))
        if chosen.sum() < 3:
            break
    return normal, offset, chosen
