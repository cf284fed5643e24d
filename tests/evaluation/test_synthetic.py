"""MOOD-style synthetic anomalies: ground truth, reproducibility, sizes, spacing, each kind's
effect and input checks."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_vaeloc.evaluation.synthetic import (
    ANOMALY_KINDS,
    MOOD_RADIUS_FRACTION,
    TUMOUR_LABELS,
    head_phantom,
    insert_anomaly,
    insert_sphere,
    random_anomaly,
    synthesize_anomaly,
)
from napari_vaeloc.io import load_volume
from napari_vaeloc.samples import sample_path


@pytest.fixture(scope="module")
def brain():
    """The bundled 96x114x96, 2 mm skull-stripped T2 brain, its foreground and depth map."""
    vol = load_volume(sample_path())
    fg = vol.data > 0
    depth = ndi.distance_transform_edt(np.pad(fg, 1), sampling=vol.spacing)[1:-1, 1:-1, 1:-1]
    lo, hi = np.percentile(vol.data[fg], [1, 99])
    return vol.data, fg, vol.spacing, depth, float(hi - lo)


def _ball_voxels(radius_mm: float, spacing) -> float:
    return 4 / 3 * np.pi * radius_mm**3 / float(np.prod(spacing))


def test_kinds_are_the_documented_ones():
    assert set(ANOMALY_KINDS) == {
        "intensity",
        "noise",
        "deformation",
        "blur",
        "reflection",
        "shift",
        "tumour",
    }


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_each_kind_changes_the_brain_only_inside_its_mask(brain, kind):
    data, fg, spacing, depth, span = brain
    before = data.copy()
    for seed in (1, 2):
        a = synthesize_anomaly(
            data, kind, np.random.default_rng(seed), foreground=fg, spacing=spacing
        )
        vol, mask, info = a.volume, a.mask, a.info
        assert vol.dtype == np.float32 and vol.shape == data.shape
        assert mask.dtype == np.uint8 and mask.shape == data.shape
        assert set(np.unique(mask)) == {0, 1}
        m = mask.astype(bool)
        assert np.array_equal(vol[~m], data[~m]), "voxels outside the mask changed"
        assert not (m & ~fg).any(), "mask leaves the foreground"
        # centred deep inside the brain, so the anomaly is not cut off by its border
        c = tuple(round(v) for v in info["center"])
        radius = info["radius_mm"]
        assert fg[c] and depth[c] >= 0.9 * radius
        assert m.sum() >= 0.5 * _ball_voxels(radius, spacing)
        assert m.sum() <= 3.5 * _ball_voxels(radius, spacing)
        # the change inside the mask is meaningful, not a few stray voxels
        diff = np.abs(vol - data)[m]
        assert diff.mean() >= 0.02 * span
        assert (diff > 0.01 * span).mean() >= 0.3
        assert info["kind"] == kind and info["n_voxels"] == m.sum()
        json.dumps(info)
        if kind != "tumour":
            assert np.array_equal(a.labels, mask)
    assert np.array_equal(data, before), "the input was modified"


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_insert_anomaly_without_foreground_on_a_phantom(kind):
    data = head_phantom((30, 34, 30), seed=3)
    vol, mask = insert_anomaly(data, kind, np.random.default_rng(7))
    m = mask.astype(bool)
    assert vol.shape == data.shape and vol.dtype == np.float32 and mask.dtype == np.uint8
    assert m.any() and np.array_equal(vol[~m], data[~m])
    assert not np.array_equal(vol, data)
    # the same call through synthesize_anomaly gives the same result
    a = synthesize_anomaly(data, kind, np.random.default_rng(7))
    assert np.array_equal(a.volume, vol) and np.array_equal(a.mask, mask)


def test_random_anomaly_is_reproducible_and_seed_dependent(brain):
    data, fg, spacing, _, _ = brain
    v1, m1, i1 = random_anomaly(data, 5, foreground=fg, spacing=spacing)
    v2, m2, i2 = random_anomaly(data, 5, foreground=fg, spacing=spacing)
    _, m3, i3 = random_anomaly(data, 6, foreground=fg, spacing=spacing)
    assert np.array_equal(v1, v2) and np.array_equal(m1, m2) and i1 == i2
    assert i1["seed"] == 5 and json.loads(json.dumps(i1)) == i1
    assert not np.array_equal(m1, m3) and i1 != i3
    for kind in ANOMALY_KINDS:  # the same holds for every kind, with every drawn parameter
        a = synthesize_anomaly(data, kind, np.random.default_rng(3), foreground=fg, spacing=spacing)
        b = synthesize_anomaly(data, kind, np.random.default_rng(3), foreground=fg, spacing=spacing)
        assert np.array_equal(a.volume, b.volume) and a.info == b.info
        _, _, info = random_anomaly(data, 3, foreground=fg, spacing=spacing, kinds=[kind])
        assert info["kind"] == kind


def test_random_anomaly_draws_varied_kinds_and_mood_sizes():
    data = head_phantom((40, 44, 40), seed=1)
    fg = data > 0
    spacing = (1.5, 1.0, 2.0)
    extent = np.mean(np.array(data.shape) * spacing)
    kinds, radii, centers = set(), [], set()
    for seed in range(24):
        vol, mask, info = random_anomaly(data, seed, foreground=fg, spacing=spacing)
        m = mask.astype(bool)
        assert np.array_equal(vol[~m], data[~m]) and m.any() and not (m & ~fg).any()
        kinds.add(info["kind"])
        radii.append(info["radius_mm"] / extent)
        centers.add(tuple(info["center"]))
    lo, hi = MOOD_RADIUS_FRACTION
    assert (lo, hi) == (0.05, 0.13)
    assert all(lo <= r <= hi for r in radii)
    assert max(radii) - min(radii) > 0.03  # sizes vary over the range
    assert len(kinds) >= 5 and len(centers) >= 15
    _, _, info = random_anomaly(data, 0, foreground=fg, kinds=("blur", "noise"))
    assert info["kind"] in ("blur", "noise")


def test_drawn_choices_take_every_value():
    data = head_phantom((24, 26, 24), seed=2)
    fg = data > 0
    seen: dict[str, set] = {"shape": set(), "direction": set(), "mirror": set(), "core": set()}
    signs = set()
    for seed in range(10):
        for kind in ("intensity", "deformation", "reflection", "tumour"):
            a = synthesize_anomaly(data, kind, np.random.default_rng(seed), foreground=fg)
            for key in seen:
                if key in a.info:
                    seen[key].add(a.info[key])
            if kind == "intensity":
                signs.add(np.sign(a.info["contrast"]))
    assert seen == {
        "shape": {"sphere", "irregular"},
        "direction": {"sink", "source"},
        "mirror": {"patch", "hemisphere"},
        "core": {"dark", "bright"},
    }
    assert signs == {-1.0, 1.0}


@pytest.mark.parametrize("core", ["dark", "bright"])
def test_tumour_has_core_rim_and_oedema(brain, core):
    data, fg, spacing, _, span = brain
    a = synthesize_anomaly(
        data, "tumour", np.random.default_rng(4), foreground=fg, spacing=spacing, core=core
    )
    assert np.array_equal(a.mask, (a.labels > 0).astype(np.uint8))
    assert set(np.unique(a.labels)) == {0, *TUMOUR_LABELS.values()}
    means = {n: a.volume[a.labels == v].mean() for n, v in TUMOUR_LABELS.items()}
    order = ["core", "oedema", "rim"] if core == "dark" else ["rim", "oedema", "core"]
    for darker, brighter in itertools.pairwise(order):
        assert means[brighter] - means[darker] >= 0.1 * span, means
    oedema = a.labels == TUMOUR_LABELS["oedema"]
    assert (a.volume - data)[oedema].mean() >= 0.15 * span  # hyperintense, like T2 oedema
    assert oedema.sum() > (a.labels >= TUMOUR_LABELS["rim"]).sum()  # oedema surrounds
    # layered: core nearest the centre, oedema farthest
    c = np.array(a.info["center"])
    dist = {
        n: np.linalg.norm((np.argwhere(a.labels == v) - c) * spacing, axis=1).mean()
        for n, v in TUMOUR_LABELS.items()
    }
    assert dist["core"] < dist["rim"] < dist["oedema"]
    # irregular: the outer boundary is far from a sphere
    lab = a.labels > 0
    edge = np.argwhere(lab & ~ndi.binary_erosion(lab))
    r = np.linalg.norm((edge - c) * spacing, axis=1)
    assert r.std() / r.mean() > 0.1


def test_sphere_blobs_are_round_and_irregular_ones_are_not(brain):
    data, fg, spacing, _, _ = brain

    def roughness(shape: str) -> float:
        a = synthesize_anomaly(
            data, "intensity", np.random.default_rng(0), foreground=fg, spacing=spacing,
            shape=shape, irregularity=0.3, radius_mm=18.0,
        )  # fmt: skip
        m = a.mask.astype(bool)
        edge = np.argwhere(m & ~ndi.binary_erosion(m))
        r = np.linalg.norm((edge - np.array(a.info["center"])) * spacing, axis=1)
        return r.std() / r.mean()

    assert roughness("sphere") < 0.06 < 0.1 < roughness("irregular")


def test_anisotropic_spacing_radius_is_in_mm():
    data = np.zeros((41, 41, 21), dtype=np.float32)
    spacing = (1.0, 1.0, 2.5)
    _, mask = insert_anomaly(
        data, "intensity", np.random.default_rng(0), spacing=spacing,
        center=(20, 20, 10), radius_mm=10.0, shape="sphere", contrast=0.25,
    )  # fmt: skip
    idx = np.argwhere(mask)
    extent = idx.max(0) - idx.min(0) + 1
    assert tuple(extent) == (21, 21, 9)  # 10 mm = 10 voxels in-plane, 4 slices of 2.5 mm
    ref = insert_sphere(data, (20, 20, 10), 10.0, 1.0, spacing=spacing)[1]
    assert np.array_equal(mask, ref)
    # deformation and tumour extents scale with the spacing too
    for kind in ("deformation", "tumour"):
        ramp = np.indices(data.shape).sum(0).astype(np.float32)
        _, m = insert_anomaly(
            ramp, kind, np.random.default_rng(1), spacing=spacing, center=(20, 20, 10),
            radius_mm=8.0,
        )  # fmt: skip
        idx = np.argwhere(m)
        ext_mm = (idx.max(0) - idx.min(0) + 1) * np.array(spacing)
        assert abs(ext_mm[0] - ext_mm[2]) <= 2 * 2.5 + 4, ext_mm
        assert ext_mm[0] <= 2 * 8.0 * 2.05 + 1


def test_default_radius_uses_the_physical_size():
    data = np.ones((30, 30, 30), dtype=np.float32)
    for spacing in ((1.0, 1.0, 1.0), (3.0, 3.0, 3.0)):
        for seed in range(5):
            a = synthesize_anomaly(data, "noise", np.random.default_rng(seed), spacing=spacing)
            frac = a.info["radius_mm"] / (30 * spacing[0])
            assert 0.05 <= frac <= 0.13


def test_intensity_and_noise_amplitudes():
    data = head_phantom((28, 30, 28), seed=0)
    fg = data > 0
    span = np.subtract(*np.percentile(data[fg], [99, 1]))
    vol, mask = insert_anomaly(
        data, "intensity", np.random.default_rng(0), foreground=fg, contrast=-0.25
    )
    d = (vol - data)[mask > 0]
    assert np.allclose(d, -0.25 * span, rtol=1e-4)
    for seed in range(4):  # default contrast: ±0.2-0.3 of the range
        vol, mask = insert_anomaly(data, "intensity", np.random.default_rng(seed), foreground=fg)
        shift = abs(float(np.mean((vol - data)[mask > 0])))
        assert 0.2 * span - 1e-4 <= shift <= 0.3 * span + 1e-4
    vol, mask = insert_anomaly(
        data, "noise", np.random.default_rng(0), foreground=fg, contrast=0.2, radius_mm=7.0
    )
    d = (vol - data)[mask > 0]
    assert abs(d.std() / span - 0.2) < 0.03 and abs(d.mean()) < 0.05 * span


def test_deformation_pulls_towards_or_pushes_from_the_centre():
    # intensity = distance from the centre: a sink shows content from farther out (brighter),
    # a source content from nearer the centre (darker)
    shape, c = (33, 33, 33), (16, 16, 16)
    data = np.sqrt(((np.indices(shape) - np.reshape(c, (3, 1, 1, 1))) ** 2).sum(0))
    for direction, sign in (("sink", 1), ("source", -1)):
        vol, mask = insert_anomaly(
            data, "deformation", np.random.default_rng(0), center=c, radius_mm=12.0,
            direction=direction, strength=2.0,
        )  # fmt: skip
        m = mask.astype(bool)
        d = (vol - data)[m] * sign
        assert d.min() >= -1e-4 and d.mean() > 0.5
        assert np.array_equal(vol[~m], data[~m].astype(np.float32))
        # the mask is the displaced part of the 12 mm sphere: every voxel in it but the centre
        # moved by at least 1/5 voxel; the thin outer shell that barely moves is left out
        r = data[m]
        assert d[r >= 1].min() >= 0.15
        assert 9.5 < r.max() < 11.5


def test_blur_smooths_and_reflection_and_shift_copy_content():
    rng0 = np.random.default_rng(11)
    data = rng0.standard_normal((30, 30, 30)).astype(np.float32) + 5
    vol, mask = insert_anomaly(data, "blur", np.random.default_rng(0), radius_mm=8.0)
    m = mask.astype(bool)
    assert vol[m].std() < 0.5 * data[m].std()
    c = (15, 14, 16)
    vol, mask = insert_anomaly(
        data, "reflection", np.random.default_rng(0), center=c, radius_mm=6.0, mirror="patch",
        axis=1, shape="sphere",
    )  # fmt: skip
    idx = np.argwhere(mask)
    src = idx.copy()
    src[:, 1] = 2 * c[1] - src[:, 1]
    assert np.array_equal(vol[tuple(idx.T)], data[tuple(src.T)])
    spacing = (2.0, 1.0, 1.0)
    vol, mask = insert_anomaly(
        data, "shift", np.random.default_rng(0), spacing=spacing, center=c, radius_mm=5.0,
        offset_mm=(10.0, -3.0, 0.0),
    )  # fmt: skip
    idx = np.argwhere(mask)
    assert np.array_equal(vol[tuple(idx.T)], data[tuple((idx + np.array([5, -3, 0])).T)])
    _, _, info = random_anomaly(data, 0, kinds=["shift"])
    assert np.linalg.norm(info["offset_mm"]) >= 0.9 * info["radius_mm"]


def test_reflection_avoids_a_mirror_that_changes_nothing(brain):
    data, fg, spacing, _, _ = brain
    a = synthesize_anomaly(
        data, "reflection", np.random.default_rng(0), foreground=fg, spacing=spacing,
        mirror="hemisphere", axis=0,
    )  # fmt: skip
    assert a.info["mean_abs_change"] < 1e-6  # the sample is left-right symmetric
    for seed in range(4):
        a = synthesize_anomaly(
            data, "reflection", np.random.default_rng(seed), foreground=fg, spacing=spacing,
            mirror="hemisphere",
        )  # fmt: skip
        assert a.info["axis"] != 0
        assert a.info["mean_abs_change"] >= 0.05


def test_bad_arguments_raise_value_error():
    data = head_phantom((20, 22, 20), seed=0)
    rng = np.random.default_rng(0)
    fg = data > 0
    cases = [
        (lambda: insert_anomaly(data, "sparkle", rng), "unknown anomaly kind"),
        (lambda: insert_anomaly(data[..., 0], "noise", rng), "3D"),
        (lambda: insert_anomaly(data[None], "noise", rng), "3D"),
        (lambda: insert_anomaly(np.full_like(data, np.nan), "noise", rng), "NaN"),
        (lambda: insert_anomaly(data.astype(complex), "noise", rng), "real"),
        (lambda: insert_anomaly(data, "noise", 0), "Generator"),
        (lambda: insert_anomaly(data, "noise", rng, spacing=(1, 1)), "spacing"),
        (lambda: insert_anomaly(data, "noise", rng, spacing=(1, 0, 1)), "spacing"),
        (lambda: insert_anomaly(data, "noise", rng, foreground=fg[:-1]), "shape"),
        (lambda: insert_anomaly(data, "noise", rng, foreground=fg & False), "empty"),
        (lambda: insert_anomaly(data, "noise", rng, center=(5, 5)), "center"),
        (lambda: insert_anomaly(data, "noise", rng, center=(5, 5, 40)), "outside the volume"),
        (lambda: insert_anomaly(data, "noise", rng, radius_mm=-2), "radius_mm"),
        (lambda: insert_anomaly(data, "noise", rng, sigma_mm=2), "unknown parameter"),
        (lambda: insert_anomaly(data, "blur", rng, shape="cube"), "shape"),
        (lambda: insert_anomaly(data, "deformation", rng, direction="up"), "direction"),
        (lambda: insert_anomaly(data, "deformation", rng, strength=5), "strength"),
        (lambda: insert_anomaly(data, "reflection", rng, axis=3), "axis"),
        (lambda: insert_anomaly(data, "shift", rng, offset_mm=(0, 0, 0)), "offset_mm"),
        (lambda: insert_anomaly(data, "tumour", rng, core="grey"), "core"),
        (
            lambda: insert_anomaly(
                data, "intensity", rng, foreground=fg, center=(0, 0, 0), radius_mm=1.0
            ),
            "no foreground",
        ),
        (lambda: random_anomaly(data, -1), "seed"),
        (lambda: random_anomaly(data, 1.5), "seed"),
        (lambda: random_anomaly(data, 0, kinds=[]), "empty"),
        (lambda: random_anomaly(data, 0, kinds=["noise", "glitter"]), "glitter"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
