"""The post-processing pipeline: weights, scales, smoothing, normalisation, threshold, minimum
lesion size."""

from __future__ import annotations

import numpy as np
import pytest

from napari_vaeloc.combine import (
    CombineSettings,
    PostProcessor,
    at_smoothing,
    finish,
    fpr_at,
    label_components,
    missed_lesions,
    robust_z,
    smooth,
    threshold_mask,
    weighted_sum,
)
from napari_vaeloc.errors import InputError
from napari_vaeloc.io import Volume
from napari_vaeloc.mapnames import COMBINABLE_MAPS
from tests.helpers import card_with, make_result, outline_reference


def _post(maps, fg, calibration=None, spacing=(1.0, 1.0, 1.0), **settings) -> PostProcessor:
    shape = next(iter(maps.values())).shape
    vol = Volume.from_array(np.random.default_rng(0).random(shape), spacing=spacing)
    result = make_result(maps, fg, vol, card_with(calibration))
    return PostProcessor(result, CombineSettings(**settings))


def test_weighted_sum_of_scaled_components():
    a = np.full((4, 4, 4), 2.0, np.float32)
    b = np.full((4, 4, 4), 10.0, np.float32)
    out = weighted_sum({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, {"a": 2.0, "b": 5.0})
    np.testing.assert_allclose(out, 1.0 + 0.5 * 2.0)
    out = weighted_sum({"a": a, "b": b}, {"a": 1.0, "b": 0.0}, {"a": 2.0})
    np.testing.assert_allclose(out, 1.0)
    with pytest.raises(KeyError):
        weighted_sum({"a": a}, {"c": 1.0}, {"c": 1.0})


def test_unknown_weights_refused_when_settings_are_made():
    with pytest.raises(InputError, match="unknown weights foo; choose from rec_error"):
        CombineSettings(weights={"foo": 1.0})
    with pytest.raises(InputError, match="smoothing"):
        CombineSettings(smoothing_mm=-1)
    with pytest.raises(InputError, match="finite"):
        CombineSettings(threshold=float("nan"))
    s = CombineSettings(weights=dict.fromkeys(COMBINABLE_MAPS, 1))
    assert s.weights == dict.fromkeys(COMBINABLE_MAPS, 1.0)
    with pytest.raises(InputError, match="unknown weights"):
        s.replace(weights={"kl-grad": 1.0})


def test_scales_from_calibration_or_fallback():
    rng = np.random.default_rng(0)
    m = rng.random((10, 10, 10)).astype(np.float32)
    fg = np.zeros(m.shape, bool)
    fg[2:8] = True
    post = _post({"kl_grad": m}, fg, {"scales": {"kl_grad": 3.0}}, weights={"kl_grad": 1.0})
    assert post.scale("kl_grad") == (3.0, True) and post.is_calibrated()
    post = _post({"kl_grad": m}, fg, None, weights={"kl_grad": 1.0})
    scale, calibrated = post.scale("kl_grad")
    assert not calibrated and not post.is_calibrated()
    assert scale == pytest.approx(np.percentile(m[fg], 99))


def test_foreground_and_smoothing():
    m = np.zeros((9, 9, 9), np.float32)
    m[4, 4, 4] = 1
    fg = np.ones(m.shape, bool)
    fg[0] = False
    cal = {"scales": {"combi": 1.0}}
    post = _post({"combi": m}, fg, cal, spacing=(1, 1, 2), smoothing_mm=1.0)
    out = post.combined()
    assert out[4, 4, 4] < 1 and out.sum() == pytest.approx(1.0, rel=1e-3)
    assert out[4, 5, 4] > out[4, 4, 5]  # 1 mm sigma is 0.5 voxel along the 2 mm axis
    m[0, 0, 0] = 5
    assert _post({"combi": m}, fg, cal).combined()[0, 0, 0] == 0


def test_smoothing_normalised_to_a_region_ignores_what_lies_outside():
    m = np.zeros((9, 9, 9), np.float32)
    m[4, 4, 4] = 1
    fg = np.ones(m.shape, bool)
    fg[0] = False
    out = smooth(m, 1.0, (1, 1, 2), fg)
    plain = smooth(m, 1.0, (1, 1, 2))
    # where the kernel lies inside the region it is the plain Gaussian
    np.testing.assert_allclose(out[4:6, 3:6, 3:6], plain[4:6, 3:6, 3:6], rtol=1e-4, atol=1e-7)
    assert (out[~fg] == 0).all()
    edge = np.zeros_like(m)
    edge[0] = 100.0  # huge values outside the region never leak in
    np.testing.assert_allclose(smooth(m + edge, 1.0, (1, 1, 2), fg), out, atol=1e-6)
    assert smooth(m + edge, 1.0, (1, 1, 2))[1].max() > 1  # while plain smoothing mixes them in
    flat = np.full(m.shape, 3.0, np.float32)  # a constant stays constant up to the edge
    np.testing.assert_allclose(smooth(flat, 2.0, (1, 1, 1), fg)[fg], 3.0, rtol=1e-5)


def test_threshold_and_min_size():
    c = np.zeros((20, 20, 20), np.float32)
    c[2:4, 2:4, 2:4] = 5  # 8 voxels
    c[10:15, 10:15, 10:15] = 5  # 125 voxels
    mask = threshold_mask(c, 1.0)
    assert mask.dtype == np.uint8 and mask.sum() == 133
    mask = threshold_mask(c, 1.0, min_size_mm3=10)
    assert mask.sum() == 125
    mask = threshold_mask(c, 1.0, min_size_mm3=10, spacing=(2, 2, 2))  # 8 voxels = 64 mm^3
    assert mask.sum() == 133
    assert threshold_mask(c, 6.0).sum() == 0


def test_settings_from_card():
    card = card_with(defaults={"weights": {"elbo_grad": 1.0}, "threshold": 2.5})
    s = CombineSettings.from_card(card)
    assert s.weights == {"elbo_grad": 1.0} and s.threshold == 2.5
    assert CombineSettings.from_card(card_with()).weights == {"combi": 1.0}


def test_robust_z_hand_checked():
    v = np.array([1.0, 2.0, 3.0, 4.0, 100.0], np.float32).reshape(5, 1, 1)
    # median 3, |v - 3| = 2 1 0 1 97 -> MAD 1, scale 1.4826
    np.testing.assert_allclose(robust_z(v).ravel(), (v.ravel() - 3.0) / 1.4826, rtol=1e-6)
    where = np.array([1, 1, 1, 0, 0], bool).reshape(5, 1, 1)  # median 2, MAD 1
    np.testing.assert_allclose(robust_z(v, where).ravel(), (v.ravel() - 2.0) / 1.4826, rtol=1e-6)
    flat = np.full((3, 3, 3), 5.0, np.float32)  # MAD 0: only the median is removed
    np.testing.assert_array_equal(robust_z(flat), 0.0)


def test_scan_normalise_removes_a_global_offset():
    rng = np.random.default_rng(1)
    base = rng.random((12, 12, 12)).astype(np.float32)
    fg = np.zeros(base.shape, bool)
    fg[2:10, 2:10, 2:10] = True
    cal = {"scales": {"combi": 1.0}}
    a = _post({"combi": base}, fg, cal, scan_normalise=True).combined()
    b = _post({"combi": 3 * base + 7}, fg, cal, scan_normalise=True).combined()
    np.testing.assert_allclose(a, b, atol=1e-4)  # offset and gain of the scan do not matter
    assert abs((a[fg] > 0).mean() - 0.5) < 0.01  # half the brain lies above its median
    assert (a[~fg] == 0).all() and a.min() == 0
    plain = _post({"combi": 3 * base + 7}, fg, cal).combined()
    assert not np.allclose(plain, a)
    s = CombineSettings.from_card(card_with(defaults={"scan_normalise": True, "threshold": 4.0}))
    assert s.scan_normalise and s.threshold == 4.0


@pytest.mark.parametrize("scan_normalise", [False, True])
def test_float16_components_give_a_float16_combination_equal_to_the_float32_one(
    scan_normalise, monkeypatch
):
    import napari_vaeloc.combine as combine

    monkeypatch.setattr(combine, "CHUNK_VOXELS", 1000)  # several chunks on a small volume
    monkeypatch.setattr(combine, "ROBUST_SAMPLE", 97)  # the median from a strided sample
    rng = np.random.default_rng(3)
    shape = (20, 18, 16)
    maps = {k: rng.gamma(2.0, 1.0, shape).astype(np.float16) for k in ("rec_error", "kl_grad")}
    fg = np.zeros(shape, bool)
    fg[3:17, 2:16, 2:14] = True
    cal = {"scales": {"rec_error": 2.0, "kl_grad": 0.5}}
    w = {"rec_error": 1.0, "kl_grad": 0.5}
    settings = dict(weights=w, smoothing_mm=2.0, scan_normalise=scan_normalise)
    half = _post(maps, fg, cal, **settings)
    b = half.combined()
    assert b.dtype == np.float16
    # what the combination was before: the same float16 components, summed and kept in float32
    inside = half._inside(half.settings)
    terms = {k: half._scaled(k, 2.0, inside) for k in maps}
    assert all(t.dtype == np.float16 for t in terms.values())
    region = fg if half.settings.foreground_only else None
    a = finish(weighted_sum(terms, w), region, scan_normalise)
    assert a.dtype == np.float32
    # the float32 result rounded once: the nearest float16 or, at a tie, its neighbour
    np.testing.assert_allclose(b.astype(np.float32), a, rtol=2.0**-11, atol=2.0**-24)
    assert not np.array_equal(a, b.astype(np.float32))  # it really is rounded
    t = float(np.median(a[a > 0]))  # a threshold amid the values
    near = np.abs(a - t) <= 2.0**-11 * np.abs(a)  # masks differ only within that rounding
    differ = threshold_mask(a, t) != half.mask(half.settings.replace(threshold=t))
    assert not (differ & ~near).any()
    mixed = _post({**maps, "rec_error": maps["rec_error"].astype(np.float32)}, fg, cal, **settings)
    assert mixed.combined().dtype == np.float32  # float16 only when every term is


def test_a_slice_of_a_fortran_ordered_volume_is_a_new_array_equal_to_np_take():
    from napari_vaeloc.combine import plane

    rng = np.random.default_rng(4)
    for volume in (rng.random((9, 7, 5)), np.asfortranarray(rng.random((9, 7, 5)) > 0.5)):
        for axis in range(3):
            for index in (0, 3, -1):
                got = plane(volume, axis, index)
                np.testing.assert_array_equal(got, np.take(volume, index, axis))
                assert got.flags.c_contiguous and not np.shares_memory(got, volume)


def test_the_slice_preview_of_a_fortran_ordered_result_equals_the_c_ordered_one():
    rng = np.random.default_rng(5)
    maps = {"rec_error": rng.gamma(2.0, 1.0, (16, 14, 12)).astype(np.float32)}
    fg = np.zeros((16, 14, 12), bool)
    fg[2:14, 2:12, 2:10] = True
    settings = dict(weights={"rec_error": 1.0}, smoothing_mm=2.0, threshold=1.5)
    c = _post(maps, fg, {"scales": {"rec_error": 1.0}}, **settings)
    f_maps = {k: np.asfortranarray(v) for k, v in maps.items()}
    f = _post(f_maps, np.asfortranarray(fg), {"scales": {"rec_error": 1.0}}, **settings)
    for post in (c, f):
        post.combined()
    for axis, index in ((0, 5), (1, 0), (2, 11)):
        a = c.slice_preview(c.settings, axis, index, compute=True)
        b = f.slice_preview(f.settings, axis, index, compute=True)
        np.testing.assert_array_equal(a.combined, b.combined)
        np.testing.assert_array_equal(a.mask, b.mask)


def test_minimum_size_from_cached_components_equals_scikit_image():
    from skimage.morphology import remove_small_objects

    rng = np.random.default_rng(3)
    c = rng.random((30, 28, 26)).astype(np.float32)
    for thr, size in ((0.7, 5.0), (0.8, 3.0), (0.6, 40.0)):
        n = int(np.ceil(size / 1.5))  # voxels of 1.5 mm^3
        ref = remove_small_objects(c > thr, max_size=n - 1, connectivity=3).astype(np.uint8)
        np.testing.assert_array_equal(threshold_mask(c, thr, size, (1.5, 1.0, 1.0)), ref)
    fg = np.ones(c.shape, bool)
    post = _post({"combi": c}, fg, {"scales": {"combi": 1.0}}, spacing=(1.5, 1.0, 1.0),
                 threshold=0.7)  # fmt: skip
    for size in (0.0, 5.0, 30.0, 3.0):  # one labelling, then size lookups
        st = post.settings.replace(min_size_mm3=size)
        np.testing.assert_array_equal(post.mask(st), threshold_mask(c, 0.7, size, post.spacing))
    # settings given explicitly leave the post-processor's own settings alone
    assert post.settings.min_size_mm3 == 0.0


@pytest.mark.parametrize("step, dtype", [(25, np.uint8), (3, np.uint16), (2, np.int32)])
def test_components_are_labelled_in_the_smallest_type_that_holds_them(step, dtype):
    from scipy.ndimage import label

    mask = np.zeros((100, 100, 100), bool)
    mask[::step, ::step, ::step] = True  # isolated voxels: 4^3, 34^3 and 50^3 parts
    mask[:5, :5, :5] = True  # and one larger part
    labels, sizes = label_components(mask)
    ref, n = label(mask, structure=np.ones((3, 3, 3), bool))
    assert labels.dtype == dtype, n
    np.testing.assert_array_equal(labels, ref)
    assert len(sizes) == n + 1 and sizes[1:].sum() == mask.sum() and sizes.max() >= 125


def _ball(shape, centre, radius, sigma):
    from scipy.ndimage import gaussian_filter

    idx = np.indices(shape)
    inside = sum((i - c) ** 2 for i, c in zip(idx, centre, strict=True)) <= radius**2
    return inside, gaussian_filter(inside.astype(np.float32), sigma)


@pytest.mark.parametrize("fraction, size", [(0.0, 0.0), (0.5, 0.0), (0.3, 20.0), (0.5, 50.0)])
def test_outlined_mask_equals_a_part_by_part_reference(fraction, size):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(7)
    c = gaussian_filter(rng.normal(size=(36, 30, 28)), 1.5).astype(np.float32)
    c = np.maximum(c / c.std(), 0)
    fg = np.ones(c.shape, bool)
    post = _post({"combi": c}, fg, {"scales": {"combi": 1.0}}, threshold=2.5)
    for thr, grow in ((2.5, 1.0), (3.0, 1.0), (2.0, 1.5)):
        st = post.settings.replace(
            threshold=thr, grow_threshold=grow, outline_fraction=fraction, min_size_mm3=size
        )
        ref = outline_reference(c, thr, grow, fraction, int(size))
        assert ref.any()
        np.testing.assert_array_equal(post.mask(st), ref)
    # a grow level at or above the threshold outlines nothing: the plain threshold mask
    st = post.settings.replace(grow_threshold=3.0, outline_fraction=0.5)
    assert st.grow_level() is None
    np.testing.assert_array_equal(post.mask(st), threshold_mask(c, 2.5))


def test_the_half_maximum_outlines_a_smoothed_lesion_where_it_is_whatever_its_strength():
    """A lesion's smoothed edge crosses half its height at the edge itself: outlined at half
    each part's peak, a strong and a weak ball get about their true volume, while a plain
    threshold near the weak ball's peak keeps only its core."""
    shape = (48, 48, 48)
    inside, blob = _ball(shape, (24, 24, 24), 9, 2.0)
    fg = np.ones(shape, bool)
    outlines = []
    for height in (8.0, 3.6):
        c = blob * height
        post = _post({"combi": c}, fg, {"scales": {"combi": 1.0}}, threshold=3.34)
        plain = post.mask().astype(bool)
        st = post.settings.replace(grow_threshold=1.0, outline_fraction=0.5)
        outlines.append(post.mask(st).astype(bool))
        dice = 2 * (outlines[-1] & inside).sum() / (outlines[-1].sum() + inside.sum())
        assert dice > 0.9, (height, dice)
        plain_dice = 2 * (plain & inside).sum() / (plain.sum() + inside.sum())
        if height < 4:
            assert plain_dice < 0.5, plain_dice  # the plain threshold: the core alone
    np.testing.assert_array_equal(outlines[0], outlines[1])  # the same outline at any height
    # no part above the threshold: nothing is marked, however much lies above the grow level
    post = _post({"combi": blob * 3.0}, fg, {"scales": {"combi": 1.0}}, threshold=3.34)
    assert not post.mask(post.settings.replace(grow_threshold=1.0, outline_fraction=0.5)).any()


@pytest.mark.parametrize("sharp", [None, 0.0])
def test_outlined_slice_previews_are_exact_once_the_parts_are_known(sharp):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(11)
    c = gaussian_filter(rng.normal(size=(30, 26, 24)), 1.5).astype(np.float32)
    c = np.maximum(c / c.std(), 0)
    fg = np.ones(c.shape, bool)
    post = _post({"combi": c}, fg, {"scales": {"combi": 1.0}}, threshold=2.5, smoothing_mm=1.0,
                 grow_threshold=1.0, outline_fraction=0.5, outline_smoothing_mm=sharp)  # fmt: skip
    # before the whole mask: the slice alone, marked approximate
    first = post.slice_preview(post.settings, 0, 12, compute=True)
    assert first is not None and not first.exact
    whole = post.mask()
    # once the parts are labelled, every slice, and every later threshold, is exact
    for thr in (2.5, 2.2, 3.1):
        st = post.settings.replace(threshold=thr)
        for axis, index in ((0, 12), (1, 5), (2, 20)):
            pv = post.slice_preview(st, axis, index)
            assert pv.exact
            key = [slice(None)] * 3
            key[axis] = index
            np.testing.assert_array_equal(pv.mask, post.mask(st)[tuple(key)])
    assert whole.any()


def _sharp_reference(c6, cs, threshold, grow, fraction, smallest=32):
    """The mask outlined on a sharper map, part by part as step 5 of the combine module states
    it: the parts of ``c6 > grow`` whose peak passes the threshold, each cut at ``fraction`` of
    its peak on the sharper map ``cs``, without the cut's pieces of fewer than ``smallest``
    voxels (MIN_OUTLINE_PIECE_MM3 at 1 mm)."""
    from scipy.ndimage import label

    structure = np.ones((3, 3, 3), bool)
    labels, count = label(c6 > grow, structure=structure)
    out = np.zeros(c6.shape, np.uint8)
    for i in range(1, count + 1):
        part = labels == i
        if c6[part].max() > threshold:
            cut = part & (cs >= fraction * cs[part].max())
            pieces, _ = label(cut, structure=structure)
            sizes = np.bincount(pieces.ravel())
            out[cut & (sizes[pieces] >= smallest)] = 1
    return out


@pytest.mark.parametrize("normalise", [False, True])
def test_a_mask_outlined_on_a_sharper_map_equals_a_part_by_part_reference(normalise):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(5)
    c = gaussian_filter(rng.normal(size=(34, 30, 26)), 1.0).astype(np.float32)
    c = np.maximum(c / c.std(), 0)
    fg = np.ones(c.shape, bool)
    fg[:3] = False
    settings = {"smoothing_mm": 2.5, "scan_normalise": normalise, "grow_threshold": 0.5,
                "outline_fraction": 0.4}  # fmt: skip
    post = _post({"combi": c}, fg, {"scales": {"combi": 1.0}}, threshold=1.5, **settings)
    for sharp in (0.0, 1.0):
        st = post.settings.replace(outline_smoothing_mm=sharp)
        alone = _post({"combi": c}, fg, {"scales": {"combi": 1.0}}, threshold=1.5, **settings)
        c6 = alone.combined(st)
        cs = alone.combined(st.replace(smoothing_mm=sharp))
        for thr, grow in np.quantile(c6[fg], [(0.99, 0.8), (0.995, 0.9), (0.9995, 0.9)]):
            levels = st.replace(threshold=thr, grow_threshold=grow)
            ref = _sharp_reference(c6, cs, thr, grow, 0.4)
            assert ref.any()
            np.testing.assert_array_equal(post.mask(levels), ref)
            plain = post.mask(levels.replace(outline_smoothing_mm=None))
            assert (plain != ref).any()  # the sharper map moves the outline
    # the combined map is the smoothed one whatever the outline is drawn on
    np.testing.assert_array_equal(post.combined(st), post.combined(st.replace(
        outline_smoothing_mm=None)))  # fmt: skip
    # outlining on the combined map's own smoothing is the plain outline
    same = st.replace(outline_smoothing_mm=2.5)
    assert same.sharp_outline() is None
    np.testing.assert_array_equal(
        post.mask(same), post.mask(same.replace(outline_smoothing_mm=None))
    )


def test_loose_voxels_beside_a_sharper_outline_are_not_a_part_of_the_mask():
    """On a grid of 3 mm slices a few voxels of the sharper map beside a lesion pass its
    outline level without touching its outline; they are no part of the mask, and a slice
    preview (after the whole mask) agrees."""
    from scipy.ndimage import label

    shape = (40, 40, 16)  # 1 x 1 x 3 mm
    inside, blob = _ball(shape, (20, 20, 8), 5, 0.7)
    c = 4.0 * blob
    c[20, 29:31, 8] = 3.0  # 2 voxels (6 mm^3), 4 mm beyond the lesion's edge
    fg = np.ones(shape, bool)
    post = _post({"combi": c.astype(np.float32)}, fg, {"scales": {"combi": 1.0}},
                 spacing=(1.0, 1.0, 3.0), threshold=1.0, smoothing_mm=3.0, grow_threshold=0.1,
                 outline_fraction=0.3, outline_smoothing_mm=0.0)  # fmt: skip
    mask = post.mask()
    _, n = label(mask, structure=np.ones((3, 3, 3), bool))
    assert n == 1, n
    assert not mask[20, 29:31, 8].any()
    assert mask[inside].mean() > 0.9
    # the loose voxels are in the part the smoothed map finds, and above its outline level
    alone = post.mask(post.settings.replace(outline_smoothing_mm=None, outline_fraction=0.0))
    assert alone[20, 29:31, 8].all()
    pv = post.slice_preview(post.settings.replace(threshold=1.2), 2, 8)
    assert pv is not None and pv.exact
    np.testing.assert_array_equal(pv.mask, post.mask(post.settings.replace(threshold=1.2))[:, :, 8])


def test_a_sharper_outline_fits_a_lesion_that_the_smoothed_map_widens():
    """A wide Gaussian spreads a lesion's map beyond it, and its half maximum moves outwards
    for a lesion not much wider than the Gaussian; outlined on a sharper map the mask fits."""
    shape = (48, 48, 48)
    inside, blob = _ball(shape, (24, 24, 24), 5, 1.0)
    rng = np.random.default_rng(3)
    c = (4.0 * blob + 0.2 * rng.random(shape)).astype(np.float32)
    fg = np.ones(shape, bool)
    post = _post({"combi": c}, fg, {"scales": {"combi": 1.0}}, threshold=0.6, smoothing_mm=4.0,
                 grow_threshold=0.2, outline_fraction=0.4)  # fmt: skip

    def dice(m):
        m = m.astype(bool)
        return 2 * (m & inside).sum() / (m.sum() + inside.sum())

    wide = post.mask()
    sharp = post.mask(post.settings.replace(outline_smoothing_mm=1.0))
    assert wide.sum() > 1.5 * inside.sum()
    assert dice(sharp) > 0.85 > dice(wide), (dice(sharp), dice(wide))
    # a threshold move reuses the sharper map: nothing is smoothed again
    before = post.outline_map(post.settings.replace(outline_smoothing_mm=1.0))
    moved = post.settings.replace(threshold=0.8, outline_smoothing_mm=1.0)
    post.mask(moved)
    assert post.outline_map(moved) is before


BAD_OUTLINES = [
    {"outline_fraction": 1.0},
    {"outline_fraction": -0.1},
    {"outline_smoothing_mm": -1.0},
    {"outline_smoothing_mm": float("inf")},
    {"grow_threshold": -1.0},
    {"grow_threshold": float("nan")},
]


@pytest.mark.parametrize("changes", BAD_OUTLINES)
def test_bad_outline_settings_are_refused(changes):
    with pytest.raises(InputError):
        CombineSettings(**changes)


def test_the_outline_comes_from_the_card():
    card = card_with(defaults={"threshold": 3.0, "grow_threshold": 1.5, "outline_fraction": 0.5,
                               "smoothing_mm": 6.0, "outline_smoothing_mm": 2.0})  # fmt: skip
    s = CombineSettings.from_card(card)
    assert (s.grow_threshold, s.outline_fraction, s.grow_level()) == (1.5, 0.5, 1.5)
    assert s.sharp_outline() == 2.0 and s.without_outline().sharp_outline() is None
    assert CombineSettings.preset("paper", card).grow_level() is None  # the paper's method


#: a calibration with levels at the default smoothing (6 mm) and at 3 and 8 mm
LEVELS = {
    "scales": {"restoration": 1.0},
    "combined_weights": {"restoration": 1.0},
    "combined_smoothing_mm": 6.0,
    "combined_scan_normalise": True,
    "combined_fpr": {"0.01": 2.9, "0.001": 3.7, "0.0001": 4.4},
    "smoothing_fpr": {
        "3": {"0.01": 3.0, "0.001": 4.0, "0.0001": 5.0},
        "8": {"0.01": 2.8, "0.001": 3.5, "0.0001": 4.1},
    },
}
LEVEL_DEFAULTS = {
    "weights": {"restoration": 1.0},
    "smoothing_mm": 6.0,
    "scan_normalise": True,
    "threshold": 3.7,
    "threshold_fpr": 0.001,
    "grow_threshold": 2.9,
    "grow_fpr": 0.01,
    "outline_fraction": 0.3,
}


def test_levels_at_other_smoothings_are_calibrated_or_interpolated():
    card = card_with(LEVELS, LEVEL_DEFAULTS)
    cal = card.calibration
    assert cal.fpr_table(3.0) == [(3.0, 0.01), (4.0, 0.001), (5.0, 0.0001)]
    assert cal.fpr_table() == cal.fpr_table(6.0) == [(2.9, 0.01), (3.7, 0.001), (4.4, 0.0001)]
    # halfway between 3 and 6 mm: each level's threshold halfway
    halfway = cal.fpr_table(4.5)
    assert [f for _, f in halfway] == [0.01, 0.001, 0.0001]
    assert [t for t, _ in halfway] == pytest.approx([2.95, 3.85, 4.7])
    assert cal.fpr_table(2.0) == [] and cal.fpr_table(9.0) == []  # beyond the calibrated ones
    assert cal.smoothing_source(3.0) == "calibrated at 3 mm"
    assert cal.smoothing_source(7.0) == "interpolated between the 6 and 8 mm calibrations"
    assert cal.smoothing_source(9.0) is None
    # what a run claims follows the smoothing
    rng = np.random.default_rng(0)
    vol = Volume.from_array(rng.random((8, 8, 8)))
    result = make_result({"restoration": rng.random((8, 8, 8)).astype(np.float32)},
                         np.ones((8, 8, 8), bool), vol, card)  # fmt: skip
    post = PostProcessor(result)
    assert post.fpr_for_threshold(3.7) == pytest.approx(0.001) and post.levels_source() is None
    post.settings = post.settings.replace(smoothing_mm=3.0)
    assert post.fpr_for_threshold(4.0) == pytest.approx(0.001)
    assert post.levels_source() == "calibrated at 3 mm"
    assert post.uncalibrated_smoothing() is None
    post.settings = post.settings.replace(smoothing_mm=2.0)
    assert post.fpr_for_threshold(4.0) is None and post.levels_source() is None
    assert post.uncalibrated_smoothing() == "smoothing 2 mm: the model is calibrated at 3-8 mm"
    post.settings = post.settings.replace(smoothing_mm=3.0, weights={"rec_error": 1.0})
    assert post.fpr_table() == []  # another combination: no levels
    assert post.uncalibrated_smoothing() is None  # not the smoothing's fault


def test_a_new_smoothing_keeps_the_levels_healthy_rates():
    card = card_with(LEVELS, LEVEL_DEFAULTS)
    default = CombineSettings.from_card(card)
    finer = at_smoothing(default, card, 3.0)
    assert finer.smoothing_mm == 3.0
    assert finer.threshold == pytest.approx(4.0)  # the 0.1 % level at 3 mm
    assert finer.grow_threshold == pytest.approx(3.0)  # the card's grow level, 1 %
    assert finer.outline_fraction == default.outline_fraction
    back = at_smoothing(finer, card, 6.0)
    assert back.threshold == pytest.approx(default.threshold)
    assert back.grow_threshold == pytest.approx(default.grow_threshold)
    # a threshold between levels keeps its rate (log-interpolated) at the new smoothing
    looser = at_smoothing(default.replace(threshold=3.3), card, 8.0)
    rate = fpr_at(card.calibration.fpr_table(), 3.3)
    assert fpr_at(card.calibration.fpr_table(8.0), looser.threshold) == pytest.approx(rate)
    # a threshold beyond the levels stays (its rate is not known), the grow level follows
    strict = at_smoothing(default.replace(threshold=6.0), card, 3.0)
    assert (strict.threshold, strict.grow_threshold) == (6.0, pytest.approx(3.0))
    # no levels at the new smoothing, or other weights: only the smoothing changes
    for settings in (default, default.replace(weights={"rec_error": 1.0})):
        sigma = 1.0 if settings is default else 3.0
        assert at_smoothing(settings, card, sigma) == settings.replace(smoothing_mm=sigma)


def test_missed_lesions_finds_the_volume_from_which_most_lesions_are_marked():
    """Lesions grouped by octave of volume (a sparse octave with the next): the limit is the
    smallest lesion of the smallest group from which every group had three quarters marked."""
    # octaves 0.5, 1, 2 ml (one lesion each): one group, 1 of 3 marked; 4 and 8 ml: 2 of 3;
    # 16 ml, left over, joins it: 3 of 4 -> marked from its smallest lesion, 6 ml, on
    lesions = [[0.5, 0], [1.2, 0], [30.0, 1], [2.0, 1], [6.0, 1], [9.0, 0], [15.0, 1]]
    m = missed_lesions(lesions)
    assert m.limit_ml == 6.0
    assert (m.below, m.found_below, m.above, m.found_above) == (3, 1, 4, 3)
    assert (m.smallest_ml, m.largest_ml) == (0.5, 30.0)
    assert m.not_ruled_out() == "lesions under about 6 ml"
    assert m.marked() == "marked 1 of 3 seeded lesions under about 6 ml, 3 of 4 larger"
    # a well-found octave above a badly found one does not lower the limit past it
    mixed = [[2.1, 1], [2.5, 1], [3.0, 1], [4.2, 0], [5.0, 0], [6.0, 1], [9.0, 1], [10, 1], [11, 1]]
    assert missed_lesions(mixed).limit_ml == 9.0
    # the largest lesions missed too: no limit
    never = missed_lesions([[1.0, 0], [5.0, 1], [20.0, 0], [40.0, 1], [60.0, 0]])
    assert never.limit_ml is None and (never.below, never.found_below) == (5, 2)
    assert never.not_ruled_out() == "a lesion of any size measured"
    assert never.marked() == "marked 2 of 5 seeded lesions of 1-60 ml, none under 5 ml"
    assert missed_lesions([[1.0, 1], [5.0, 0], [20.0, 0]]).marked() == (
        "marked 1 of 3 seeded lesions of 1-20 ml"  # the smallest marked: nothing to add
    )
    # every group marked: nothing below the smallest lesion measured is claimed
    every = missed_lesions([[0.7, 1], [0.8, 1], [0.9, 1], [3.0, 1]])
    assert every.limit_ml == 0.7 and every.below == 0
    assert every.not_ruled_out() == "lesions under 0.7 ml, the smallest measured"
    assert every.marked() == "marked 4 of 4 seeded lesions of 0.7-3 ml"
    with pytest.raises(ValueError, match="no lesions"):
        missed_lesions([])
