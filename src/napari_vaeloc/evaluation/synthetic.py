"""Synthetic data with ground truth: head-like phantoms and inserted lesions (numpy, seeded).

Besides the phantom and plain spheres, :func:`insert_anomaly` and :func:`random_anomaly` insert
MOOD-challenge-style anomalies (see :data:`ANOMALY_KINDS`) into a 3D volume and return the
ground-truth mask: the volume is unchanged outside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Coordinates in [-1, 1] along each axis, broadcastable to ``shape``."""
    return list(np.ogrid[tuple(slice(-1.0, 1.0, complex(0, n)) for n in shape)])


def head_phantom(shape: tuple[int, int, int] = (48, 56, 48), seed: int = 0) -> np.ndarray:
    """A healthy-looking head phantom, float32 (X, Y, Z) in [0, ~1].

    Skull shell, brain ellipsoid with two ventricles, and smooth random texture; ``seed`` varies
    the size, position and texture a little, like different subjects.
    """
    rng = np.random.default_rng(seed)
    x, y, z = _grid(shape)
    s = 1 + 0.06 * rng.standard_normal(3)
    c = 0.03 * rng.standard_normal(3)
    r = (
        ((x - c[0]) / (0.78 * s[0])) ** 2
        + ((y - c[1]) / (0.88 * s[1])) ** 2
        + ((z - c[2]) / (0.80 * s[2])) ** 2
    )
    vol = np.zeros(shape, dtype=np.float32)
    vol[r < 1.0] = 0.9  # skull / scalp
    vol[r < 0.80] = 0.55  # brain
    for side in (-1, 1):
        v = (
            ((x - c[0] - side * 0.13) / 0.08) ** 2
            + ((y - c[1]) / 0.30) ** 2
            + ((z - c[2]) / 0.18) ** 2
        )
        vol[(v < 1.0) & (r < 0.8)] = 0.95  # ventricles (CSF-bright, T2-like)
    from scipy.ndimage import gaussian_filter

    tex = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    tex /= tex.std() + 1e-8
    vol += np.where(r < 0.8, 0.05 * tex, 0).astype(np.float32)
    vol = gaussian_filter(vol, 0.7)
    vol += 0.01 * rng.standard_normal(shape).astype(np.float32)
    vol[r >= 1.0] = 0
    return np.clip(vol, 0, None).astype(np.float32)


def insert_sphere(
    data: np.ndarray,
    center: tuple[float, ...],
    radius: float,
    intensity: float,
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
    mode: str = "add",
) -> tuple[np.ndarray, np.ndarray]:
    """Copy of ``data`` with a sphere (radius in mm, centre in voxels) shifted by ``intensity``
    (``mode="add"``) or set to it (``mode="set"``); returns (volume, uint8 ground-truth mask)."""
    idx = np.ogrid[tuple(slice(0, n) for n in data.shape)]
    d2 = sum(((i - c) * sp) ** 2 for i, c, sp in zip(idx, center, spacing, strict=False))
    mask = d2 <= radius**2
    out = np.array(data, dtype=np.float32, copy=True)
    if mode == "add":
        out[mask] += np.float32(intensity)
    elif mode == "set":
        out[mask] = np.float32(intensity)
    else:
        raise ValueError(f"mode must be 'add' or 'set', not {mode!r}")
    return out, mask.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# MOOD-style synthetic anomalies with ground truth
# --------------------------------------------------------------------------------------------

ANOMALY_KINDS: tuple[str, ...] = (
    "intensity",
    "noise",
    "deformation",
    "blur",
    "reflection",
    "shift",
    "tumour",
)
"""Names accepted by :func:`insert_anomaly` and :func:`random_anomaly`."""

MOOD_RADIUS_FRACTION: tuple[float, float] = (0.05, 0.13)
"""Default anomaly radius, as a fraction of the volume's mean physical extent (MOOD convention)."""

TUMOUR_LABELS: dict[str, int] = {"oedema": 1, "rim": 2, "core": 3}
"""Values of :attr:`Anomaly.labels` for the layers of a ``"tumour"``."""

_SHAPES = ("sphere", "irregular")
_PARAMS: dict[str, tuple[str, ...]] = {
    "intensity": ("contrast", "shape", "irregularity"),
    "noise": ("contrast", "shape", "irregularity"),
    "deformation": ("direction", "strength"),
    "blur": ("sigma_mm", "shape", "irregularity"),
    "reflection": ("mirror", "axis", "shape", "irregularity"),
    "shift": ("offset_mm", "shape", "irregularity"),
    "tumour": (
        "core",
        "core_fraction",
        "rim_fraction",
        "core_level",
        "rim_level",
        "oedema_contrast",
        "irregularity",
    ),
}
_MIN_CHANGE = 0.05  # reflection: smallest mean |change| (fraction of range) accepted for an axis


@dataclass(frozen=True, eq=False)
class Anomaly:
    """One inserted anomaly.

    Attributes:
        volume: float32 (X, Y, Z), the input with the anomaly; equal to the input outside ``mask``.
        mask: uint8 (X, Y, Z), 1 in the region the anomaly changed (the ground truth).
        labels: uint8 (X, Y, Z); for ``"tumour"`` the layers of :data:`TUMOUR_LABELS`
            (1 oedema, 2 rim, 3 core), for the other kinds equal to ``mask``.
        info: JSON-serialisable description: kind, centre (voxels), radius_mm and every drawn
            parameter, in the units their names give (fractions are of the intensity range).
    """

    volume: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    info: dict[str, Any]


class _Ctx:
    """The input of one insertion: float32 data, foreground, spacing, rng and intensity range."""

    def __init__(
        self,
        data: np.ndarray,
        foreground: np.ndarray | None,
        spacing: np.ndarray,
        rng: np.random.Generator,
    ):
        self.data = data
        self.fg = foreground
        self.spacing = spacing
        self.rng = rng
        vals = data[foreground] if foreground is not None else data.ravel()
        lo, hi = (float(v) for v in np.percentile(vals, [1, 99]))
        if not hi > lo:  # flat image: fall back to its magnitude
            hi = lo + max(abs(lo), 1.0)
        self.lo, self.span = lo, hi - lo
        self._dist: np.ndarray | None = None

    def depth(self) -> np.ndarray:
        """Distance in mm from each voxel to the nearest background voxel or volume border."""
        if self._dist is None:
            assert self.fg is not None
            idx = np.argwhere(self.fg)
            lo, hi = idx.min(0), idx.max(0) + 1
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            inner = np.pad(self.fg[box], 1)  # the border counts as background
            d = ndi.distance_transform_edt(inner, sampling=self.spacing)[1:-1, 1:-1, 1:-1]
            self._dist = np.zeros(self.fg.shape, dtype=np.float32)
            self._dist[box] = d
        return self._dist

    def uniform(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]


# ---- input checks ---------------------------------------------------------------------------


def _check_data(data: Any) -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ValueError(f"data must be a 3D volume (X, Y, Z); got {arr.ndim}D, shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise ValueError(f"data must hold real numbers, not {arr.dtype}")
    if min(arr.shape) < 2:
        raise ValueError(f"data must have at least 2 voxels along every axis; shape {arr.shape}")
    out = arr.astype(np.float32, copy=True)
    if not np.isfinite(out).all():
        raise ValueError("data contains NaN or infinite values")
    return out


def _check_spacing(spacing: Any) -> np.ndarray:
    try:
        sp = np.asarray(spacing, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be 3 positive numbers (mm), not {spacing!r}") from None
    if sp.shape != (3,) or not (np.isfinite(sp).all() and (sp > 0).all()):
        raise ValueError(f"spacing must be 3 positive finite numbers (mm), not {spacing!r}")
    return sp


def _check_foreground(foreground: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if foreground is None:
        return None
    fg = np.asarray(foreground)
    if fg.shape != shape:
        raise ValueError(f"foreground has shape {fg.shape}, data has shape {shape}")
    fg = fg.astype(bool)
    if not fg.any():
        raise ValueError("foreground is empty")
    return fg


def _check_number(name: str, value: Any, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if not (np.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], not {value!r}")
    return v


def _check_choice(name: str, value: Any, options: Sequence[Any]) -> Any:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, not {value!r}")
    return value


# ---- geometry -------------------------------------------------------------------------------


def _box(
    shape: tuple[int, ...], center: np.ndarray, extent_mm: float, spacing: np.ndarray
) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    """Slices of the box around ``center`` reaching ``extent_mm`` along each axis, and the
    voxels' offsets from the centre in mm (one broadcastable array per axis)."""
    slices, rel = [], []
    for ax, (n, c, sp) in enumerate(zip(shape, center, spacing, strict=True)):
        a = max(0, int(np.floor(c - extent_mm / sp)))
        b = min(n, int(np.ceil(c + extent_mm / sp)) + 1)
        slices.append(slice(a, b))
        view = [1, 1, 1]
        view[ax] = b - a
        rel.append(((np.arange(a, b) - c) * sp).reshape(view))
    return tuple(slices), rel


def _unit(rel: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Distance from the centre (mm) and unit direction (3, ...) of every voxel in a box."""
    full = np.broadcast_arrays(*rel)
    r = np.sqrt(sum(f**2 for f in full))
    safe = np.where(r > 0, r, 1.0)
    u = np.stack([np.where(r > 0, f / safe, 1.0 if i == 0 else 0.0) for i, f in enumerate(full)])
    return r, u


def _direction_noise(rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
    """Smooth random function of the direction ``u`` (3, ...), about zero mean and unit std."""
    g = ndi.gaussian_filter(rng.standard_normal((9, 9, 9)), 1.5)
    g = (g - g.mean()) / (g.std() + 1e-12)
    return ndi.map_coordinates(g, 4.0 + 3.5 * u, order=1, mode="nearest")


def _voxel_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: np.ndarray
) -> np.ndarray:
    """Gaussian-smoothed white noise of ``shape`` with unit std."""
    n = ndi.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="reflect")
    return n / (n.std() + 1e-12)


def _blob(
    ctx: _Ctx, center: np.ndarray, radius: float, shape: str, irregularity: float
) -> tuple[np.ndarray, tuple[slice, ...], np.ndarray]:
    """Sphere or irregular blob (radius modulated by smoothed noise over the direction),
    restricted to the foreground: full-size bool mask, its box and the voxels' distances (mm)."""
    extent = radius * (1.6 if shape == "irregular" else 1.0)
    box, rel = _box(ctx.data.shape, center, extent, ctx.spacing)
    r, u = _unit(rel)
    if shape == "irregular":
        rad = radius * np.clip(1.0 + irregularity * _direction_noise(ctx.rng, u), 0.5, 1.6)
    else:
        rad = radius
    inside = r <= rad
    mask = np.zeros(ctx.data.shape, dtype=bool)
    mask[box] = inside if ctx.fg is None else inside & ctx.fg[box]
    return mask, box, r


def _draw_center(ctx: _Ctx, radius: float) -> np.ndarray:
    """A voxel at least 0.9 radius (mm) inside the foreground (or the volume), drawn uniformly;
    the deepest voxels when the foreground is too thin for that."""
    shape = np.asarray(ctx.data.shape)
    if ctx.fg is None:
        margin = np.minimum(radius / ctx.spacing, (shape - 1) / 2)
        return np.round(ctx.rng.uniform(margin, shape - 1 - margin))
    depth = ctx.depth()
    need = min(0.9 * radius, 0.9 * float(depth.max()))
    cand = np.flatnonzero(depth >= need)
    return np.array(np.unravel_index(cand[ctx.rng.integers(len(cand))], ctx.data.shape), float)


# ---- the kinds ------------------------------------------------------------------------------
# Each writes its anomaly into ``out`` (a float32 copy of ``ctx.data``), only at the voxels it
# returns (bool mask, or uint8 labels for the tumour), and records what it drew in ``info``.


def _shape_params(ctx: _Ctx, p: dict[str, Any], info: dict[str, Any]) -> tuple[str, float]:
    shape = _check_choice("shape", p["shape"], _SHAPES) if "shape" in p else ctx.pick(_SHAPES)
    if "irregularity" in p:
        irr = _check_number("irregularity", p["irregularity"], 0.0, 0.5)
    else:
        irr = ctx.uniform(0.15, 0.3) if shape == "irregular" else 0.0
    info.update(shape=shape, irregularity=irr)
    return shape, irr


def _intensity(
    ctx: _Ctx,
    out: np.ndarray,
    center: np.ndarray,
    radius: float,
    p: dict[str, Any],
    info: dict[str, Any],
) -> np.ndarray:
    shape, irr = _shape_params(ctx, p, info)
    if "contrast" in p:
        contrast = _check_number("contrast", p["contrast"], -10.0, 10.0)
    else:
        contrast = (1.0 if ctx.rng.random() < 0.5 else -1.0) * ctx.uniform(0.2, 0.3)
    info["contrast"] = contrast
    mask, _, _ = _blob(ctx, center, radius, shape, irr)
    out[mask] += np.float32(contrast * ctx.span)
    return mask


def _noise(
    ctx: _Ctx,
    out: np.ndarray,
    center: np.ndarray,
    radius: float,
    p: dict[str, Any],
    info: dict[str, Any],
) -> np.ndarray:
    shape, irr = _shape_params(ctx, p, info)
    if "contrast" in p:
        contrast = _check_number("contrast", p["contrast"], 0.0, 10.0)
    else:
        contrast = ctx.uniform(0.15, 0.3)
    info["contrast"] = contrast  # noise std, fraction of the range
    mask, _, _ = _blob(ctx, center, radius, shape, irr)
    noise = ctx.rng.standard_normal(int(mask.sum())) * (contrast * ctx.span)
    out[mask] += noise.astype(np.float32)
    return mask


def _deformation(
    ctx: _Ctx,
    out: np.ndarray,
    center: np.ndarray,
    radius: float,
    p: dict[str, Any],
    info: dict[str, Any],
) -> np.ndarray:
    if "direction" in p:
        direction = _check_choice("direction", p["direction"], ("sink", "source"))
    else:
        direction = ctx.pick(("sink", "source"))
    b = _check_number("strength", p["strength"], 0.0, 2.9) if "strength" in p else None
    b = ctx.uniform(1.8, 2.8) if b is None else b
    info.update(direction=direction, strength=b)
    # radial map t -> h(t) on [0, 1] (t = distance / radius); a voxel at t takes the value found
    # at h(t). Sink: h(t) = t (1 + b (1 - t)^2) > t, content pulled towards the centre; source:
    # its inverse, content pushed outwards. Monotone for b < 3, identity at t = 0 and t = 1.
    tg = np.linspace(0.0, 1.0, 2049)
    hs = tg * (1.0 + b * (1.0 - tg) ** 2)
    hg = hs if direction == "sink" else np.interp(tg, hs, tg)
    moved = np.abs(hg - tg) * radius >= 0.2 * ctx.spacing.min()  # > 1/5 voxel
    if not moved.any():
        raise ValueError(f"deformation of radius {radius} mm and strength {b} moves nothing")
    t_max = float(tg[np.flatnonzero(moved)[-1]])  # beyond it displacement fades below 1/5 voxel
    info["max_displacement_mm"] = float(np.abs(hg - tg).max() * radius)
    box, rel = _box(ctx.data.shape, center, radius, ctx.spacing)
    r, _ = _unit(rel)
    t = r / radius
    inside = t < t_max
    if ctx.fg is not None:
        inside &= ctx.fg[box]
    scale0 = (1.0 + b) if direction == "sink" else 1.0 / (1.0 + b)
    h = np.interp(t, tg, hg)
    scale = np.where(t > 0, h / np.where(t > 0, t, 1.0), scale0)
    coords = np.stack(
        [
            (c + np.broadcast_to(rel_i * scale / sp, t.shape))[inside]
            for c, rel_i, sp in zip(center, rel, ctx.spacing, strict=True)
        ]
    )
    vals = ndi.map_coordinates(ctx.data, coords, order=1, mode="nearest")
    out[box][inside] = vals
    mask = np.zeros(ctx.data.shape, dtype=bool)
    mask[box] = inside
    return mask


def _blur(
    ctx: _Ctx,
    out: np.ndarray,
    center: np.ndarray,
    radius: float,
    p: dict[str, Any],
    info: dict[str, Any],
) -> np.ndarray:
    shape, irr = _shape_params(ctx, p, info)
    if "sigma_mm" in p:
        sigma = _check_number("sigma_mm", p["sigma_mm"], 1e-3, 1e4)
    else:
        sigma = ctx.uniform(0.2, 0.4) * radius
    info["sigma_mm"] = sigma
    mask, _, _ = _blob(ctx, center, radius, shape, irr)
    box, _ = _box(ctx.data.shape, center, radius * 1.6 + 4 * sigma, ctx.spacing)
    blurred = ndi.gaussian_filter(ctx.data[box], sigma / ctx.spacing, mode="nearest")
    local = mask[box]
    out[box][local] = blurred[local]
    return mask


def _reflection(
    ctx: _Ctx,
    out: np.ndarray,
    center: np.ndarray,
    radius: float,
    p: dict[str, Any],
    info: dict[str, Any],
) -> np.ndarray:
    if "mirror" in p:
        mirror = _check_choice("mirror", p["mirror"], ("patch", "hemisphere"))
    else:
        mirror = ctx.pick(("patch", "hemisphere"))
    if "axis" in p:
        axes = [_check_choice("axis", p["axis"], (0, 1, 2))]
    else:
        axes = [int(a) for a in ctx.rng.permutation(3)]
    shape, irr = _shape_params(ctx, p, info)
    mask, _, _ = _blob(ctx, center, radius, shape, irr)
    idx = np.nonzero(mask)
    orig = ctx.data[idx]
    if mirror == "hemisphere":
        mid = ndi.center_of_mass(ctx.fg) if ctx.fg is not None else (np.array(out.shape) - 1) / 2
    best = None
    for axis in axes:  # the first axis whose mirrored content really differs (brains are symmetric)
        plane = float(center[axis] if mirror == "patch" else mid[axis])
        coords = np.array(idx, dtype=np.float64)
        coords[axis] = 2 * plane - coords[axis]
        vals = ndi.map_coordinates(ctx.data, coords, order=1, mode="nearest")
        change = float(np.abs(vals - orig).mean() / ctx.span)
        if best is None or change > best[0]:
            best = (change, axis, plane, vals)
        if change >= _MIN_CHANGE:
            break
    assert best is not None
    _, axis, plane, vals = best
    info.update(mirror=mirror, axis=axis, plane=plane)
    out[idx] = vals
    return mask


def _shift(
    ctx: _Ctx,
    out: np.ndarray,
    center: np.ndarray,
    radius: float,
    p: dict[str, Any],
    info: dict[str, Any],
) -> np.ndarray:
    shape, irr = _shape_params(ctx, p, info)
    n = np.asarray(ctx.data.shape)
    if "offset_mm" in p:
        try:
            off_mm = np.asarray(p["offset_mm"], dtype=np.float64).ravel()
        except (TypeError, ValueError):
            off_mm = np.zeros(0)
        if off_mm.shape != (3,) or not np.isfinite(off_mm).all():
            raise ValueError(f"offset_mm must be 3 finite numbers, not {p['offset_mm']!r}")
        off = np.round(off_mm / ctx.spacing)
        if not off.any():
            raise ValueError(f"offset_mm {p['offset_mm']!r} is shorter than half a voxel")
    else:  # a source patch 1-1.6 radii away, preferably deep inside the foreground
        best = None
        for _ in range(32):
            d = ctx.rng.standard_normal(3)
            d *= ctx.uniform(1.0, 1.6) * radius / np.linalg.norm(d)
            o = np.round(d / ctx.spacing)
            src = center + o
            if not o.any() or (src < 0).any() or (src > n - 1).any():
                continue
            score = 1.0 if ctx.fg is None else float(ctx.depth()[tuple(src.astype(int))])
            if best is None or score > best[0]:
                best = (score, o)
            if score >= 0.5 * radius:
                break
        off = best[1] if best is not None else np.array([1.0, 0.0, 0.0])
    info["offset_mm"] = [float(v) for v in off * ctx.spacing]
    mask, _, _ = _blob(ctx, center, radius, shape, irr)
    idx = np.nonzero(mask)
    src = tuple(np.clip(i + int(o), 0, s - 1) for i, o, s in zip(idx, off, n, strict=True))
    out[idx] = ctx.data[src]
    return mask


def _tumour(
    ctx: _Ctx,
    out: np.ndarray,
    center: np.ndarray,
    radius: float,
    p: dict[str, Any],
    info: dict[str, Any],
) -> np.ndarray:
    rng = ctx.rng
    core = _check_choice("core", p["core"], ("dark", "bright")) if "core" in p else None
    core = core or ctx.pick(("dark", "bright"))

    def param(name: str, lo: float, hi: float, bounds: tuple[float, float]) -> float:
        return _check_number(name, p[name], *bounds) if name in p else ctx.uniform(lo, hi)

    core_f = param("core_fraction", 0.3, 0.5, (0.0, 0.9))
    rim_f = param("rim_fraction", 0.1, 0.2, (0.0, 0.9))
    if core_f + rim_f > 0.95:
        raise ValueError("core_fraction + rim_fraction must be at most 0.95 (the rest is oedema)")
    core_level = param("core_level", *((0.0, 0.15) if core == "dark" else (0.95, 1.1)), (-10, 10))
    rim_level = param("rim_level", *((0.9, 1.05) if core == "dark" else (0.25, 0.4)), (-10, 10))
    oedema = param("oedema_contrast", 0.2, 0.35, (0.0, 10.0))
    irr = param("irregularity", 0.15, 0.3, (0.0, 0.5))
    info.update(
        core=core,
        core_fraction=core_f,
        rim_fraction=rim_f,
        core_level=core_level,
        rim_level=rim_level,
        oedema_contrast=oedema,
        irregularity=irr,
    )
    box, rel = _box(ctx.data.shape, center, 2.0 * radius, ctx.spacing)
    r, u = _unit(rel)
    outer = radius * np.clip(1.0 + irr * _direction_noise(rng, u), 0.5, 1.5)
    inner = radius * np.clip(1.0 + 0.5 * irr * _direction_noise(rng, u), 0.5, 1.6)
    sigma_vox = 0.2 * radius / ctx.spacing
    ragged = _voxel_noise(rng, r.shape, sigma_vox)  # finger-like oedema boundary
    tex = _voxel_noise(rng, r.shape, 0.05 * radius / ctx.spacing)
    rho_o = r / outer + np.clip(0.5 * irr * ragged, -0.25, 0.25)  # reaches at most 2 radii
    rho_i = r / inner
    lab = np.zeros(r.shape, dtype=np.uint8)
    lab[rho_o < 1.0] = TUMOUR_LABELS["oedema"]
    lab[rho_i < core_f + rim_f] = TUMOUR_LABELS["rim"]
    lab[rho_i < core_f] = TUMOUR_LABELS["core"]
    if ctx.fg is not None:
        lab[~ctx.fg[box]] = 0
    local = out[box]
    span, lo = ctx.span, ctx.lo
    for name, value in (
        ("core", lo + span * (core_level + 0.03 * tex)),
        ("rim", lo + span * (rim_level + 0.03 * tex)),
        ("oedema", local + span * oedema * (0.85 + 0.15 * tex)),
    ):
        sel = lab == TUMOUR_LABELS[name]
        local[sel] = value[sel]
        info[f"n_{name}"] = int(sel.sum())
    labels = np.zeros(ctx.data.shape, dtype=np.uint8)
    labels[box] = lab
    return labels


_KINDS = {
    "intensity": _intensity,
    "noise": _noise,
    "deformation": _deformation,
    "blur": _blur,
    "reflection": _reflection,
    "shift": _shift,
    "tumour": _tumour,
}


# ---- public API -----------------------------------------------------------------------------


def synthesize_anomaly(
    data: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    center: Sequence[float] | None = None,
    radius_mm: float | None = None,
    **params: Any,
) -> Anomaly:
    """Insert one anomaly of ``kind`` (see :data:`ANOMALY_KINDS`) into a copy of ``data``.

    Args:
        data: 3D volume (X, Y, Z), any real dtype; not modified.
        kind: one of :data:`ANOMALY_KINDS`.
        rng: ``np.random.Generator``; every unspecified parameter is drawn from it.
        foreground: bool (X, Y, Z); the anomaly is centred inside it and restricted to it.
        spacing: voxel size along each axis, mm.
        center: anomaly centre in voxel coordinates; drawn when None, at least 0.9 radius inside
            the foreground (or the volume).
        radius_mm: nominal radius in mm; drawn when None, uniformly in
            :data:`MOOD_RADIUS_FRACTION` of the mean physical extent of the volume. For
            ``"tumour"`` it is the outer radius of the oedema.
        **params: kind-specific settings, drawn when absent. Intensities are fractions of the
            foreground's intensity range (1st-99th percentile). ``shape`` ("sphere" /
            "irregular") and ``irregularity`` (0-0.5) for blob kinds; ``contrast`` (intensity:
            signed shift; noise: std); ``direction`` ("sink" / "source") and ``strength`` (0-2.9)
            for deformation; ``sigma_mm`` for blur; ``mirror`` ("patch" / "hemisphere") and
            ``axis`` for reflection; ``offset_mm`` (3 numbers) for shift; ``core`` ("dark" /
            "bright"), ``core_fraction``, ``rim_fraction``, ``core_level``, ``rim_level``,
            ``oedema_contrast`` and ``irregularity`` for tumour.

    Raises:
        ValueError: unknown kind or parameter, data not 3D or not finite, bad spacing,
            foreground, centre or radius, or an anomaly that misses the foreground.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown anomaly kind {kind!r}; choose from {ANOMALY_KINDS}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy Generator (np.random.default_rng(seed)), not {type(rng)}"
        )
    unknown = sorted(set(params) - set(_PARAMS[kind]))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {kind!r}; allowed: {_PARAMS[kind]}")
    arr = _check_data(data)
    sp = _check_spacing(spacing)
    fg = _check_foreground(foreground, arr.shape)
    ctx = _Ctx(arr, fg, sp, rng)
    if radius_mm is None:
        extent = float(np.mean(np.asarray(arr.shape) * sp))
        radius = ctx.uniform(*MOOD_RADIUS_FRACTION) * extent
    else:
        radius = _check_number("radius_mm", radius_mm, 1e-6, np.inf)
    if center is None:
        c = _draw_center(ctx, radius)
    else:
        try:
            c = np.asarray(center, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            c = np.zeros(0)
        if c.shape != (3,) or not np.isfinite(c).all():
            raise ValueError(f"center must be 3 finite voxel coordinates, not {center!r}")
        if (c < 0).any() or (c > np.asarray(arr.shape) - 1).any():
            raise ValueError(f"center {center!r} lies outside the volume of shape {arr.shape}")
    info: dict[str, Any] = {
        "kind": kind,
        "center": [float(v) for v in c],
        "radius_mm": float(radius),
        "spacing": [float(v) for v in sp],
        "intensity_range": [ctx.lo, ctx.lo + ctx.span],
    }
    out = arr.copy()
    result = _KINDS[kind](ctx, out, c, radius, params, info)
    labels = result.astype(np.uint8)
    mask = (labels > 0).astype(np.uint8)
    if not mask.any():
        raise ValueError(
            f"the {kind} anomaly at {info['center']} (radius {radius:.3g} mm) covers no "
            "foreground voxel; choose another center or a larger radius"
        )
    info["n_voxels"] = int(mask.sum())
    info["mean_abs_change"] = float(np.abs(out - arr)[mask > 0].mean() / ctx.span)
    return Anomaly(volume=out, mask=mask, labels=labels, info=info)


def insert_anomaly(
    data: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    center: Sequence[float] | None = None,
    radius_mm: float | None = None,
    **params: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Copy of ``data`` (X, Y, Z) with one anomaly of ``kind``; returns (float32 volume, uint8
    ground-truth mask), both of ``data``'s shape. The volume equals ``data`` outside the mask.
    Arguments as in :func:`synthesize_anomaly`."""
    a = synthesize_anomaly(
        data,
        kind,
        rng,
        foreground=foreground,
        spacing=spacing,
        center=center,
        radius_mm=radius_mm,
        **params,
    )
    return a.volume, a.mask


def random_anomaly(
    data: np.ndarray,
    seed: int,
    *,
    foreground: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    kinds: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One anomaly of a kind drawn from ``kinds`` (default: all of :data:`ANOMALY_KINDS`) with
    every parameter drawn from ``np.random.default_rng(seed)``; the same seed gives the same
    output. Returns (float32 volume, uint8 mask, JSON-serialisable info with ``seed``)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    if kinds is None:
        kinds = ANOMALY_KINDS
    elif isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError("kinds is empty")
    bad = [k for k in kinds if k not in _KINDS]
    if bad:
        raise ValueError(f"unknown anomaly kind(s) {bad}; choose from {ANOMALY_KINDS}")
    rng = np.random.default_rng(int(seed))
    kind = kinds[int(rng.integers(len(kinds)))]
    a = synthesize_anomaly(data, kind, rng, foreground=foreground, spacing=spacing)
    return a.volume, a.mask, {"seed": int(seed), **a.info}
