"""Fusing the bundled T1 model with its coronal and sagittal companions (real models, real scan)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from napari_vaeloc.engine import EngineOptions, localize, localize_axis
from napari_vaeloc.errors import InputError
from napari_vaeloc.io import Volume, load_volume
from napari_vaeloc.models.store import load_model
from napari_vaeloc.samples import sample_path

MAPS = ("rec_error_smooth", "kl_grad", "reconstruction")


@pytest.fixture(scope="module")
def t1():
    return load_model("t1-brain"), load_volume(sample_path("t1-healthy"))


def _reports(vol: Volume, name: str) -> int:
    """How many progress reports the model ``name`` makes scoring ``vol`` alone."""
    reports: list[int] = []
    options = EngineOptions(device="cpu", progress=lambda done, total: reports.append(done))
    localize_axis(vol, load_model(name), options, maps=("kl_grad",))
    return len(reports)


def test_t1_brain_fuses_three_axes_by_default(t1):
    model, vol = t1
    assert model.card.defaults.fuse is True  # the card's default: results.md, "Before and after"
    steps: list[tuple[int, int]] = []
    stages: list[str] = []
    options = EngineOptions(
        device="cpu", progress=lambda d, t: steps.append((d, t)), stage=stages.append
    )
    fused = localize(vol, model, options, maps=MAPS)
    assert stages.count("scoring slices") == 1, stages  # one for the three axes
    single = localize(vol, model, EngineOptions(device="cpu"), maps=MAPS, fuse=False)
    assert "axial, coronal, sagittal" in fused.notes[-1]
    assert fused.fused_axes == ("axial", "coronal", "sagittal") and not single.fused_axes
    assert fused.slices == "axial, coronal and sagittal slices fused"
    assert single.slices == "axial slices"
    assert not any("averaged" in n for n in single.notes)
    assert any("fusion off" in n and "approximately" in n for n in single.notes), single.notes
    # progress counts the slices of all three axes (each axis's slices are one of the scan's
    # dimensions), out of a total fixed from the start, and ends there
    assert {total for _, total in steps} == {sum(vol.shape)}
    assert steps[-1][0] == sum(vol.shape)
    assert all(b[0] >= a[0] for a, b in itertools.pairwise(steps))  # never backwards
    # more steps than the axial run alone reports: the companions' batches count too
    assert len(steps) > _reports(vol, "t1-brain")
    # the model's own reconstruction and slice scores; the maps are averages
    np.testing.assert_array_equal(fused.maps["reconstruction"], single.maps["reconstruction"])
    np.testing.assert_array_equal(fused.slice_scores["kl"], single.slice_scores["kl"])
    assert not np.allclose(fused.maps["rec_error_smooth"], single.maps["rec_error_smooth"])
    # in the model's units: the healthy brain's typical value stays close to the single axis's
    fg = fused.foreground
    ratio = np.median(fused.maps["rec_error_smooth"][fg]) / np.median(
        single.maps["rec_error_smooth"][fg]
    )
    assert 0.7 < ratio < 1.3
    again = localize(vol, model, EngineOptions(device="cpu"), maps=MAPS, fuse=True)
    np.testing.assert_array_equal(again.maps["kl_grad"], fused.maps["kl_grad"])


def test_other_axis_or_no_companions(t1):
    model, vol = t1
    coronal = localize(vol, model, EngineOptions(device="cpu"), maps=MAPS, axis="coronal")
    assert not any("averaged" in n for n in coronal.notes)  # asked for one other axis
    assert not coronal.fused_axes and coronal.slices == "coronal slices"
    assert any("by its axial network alone" in n for n in coronal.notes), coronal.notes
    with pytest.raises(InputError, match="cannot fuse along the coronal axis"):
        localize(vol, model, EngineOptions(device="cpu"), maps=MAPS, axis="coronal", fuse=True)
    with pytest.raises(InputError, match="no companion models"):
        localize(vol, load_model("t1-brain-coronal"), EngineOptions(device="cpu"), fuse=True)


def test_the_companion_slicing_thick_slabs_is_left_out(t1):
    """Given the plane of the scan's thick slabs, the companion that slices along it is left
    out of the average with a note; the model's own axis is always scored. A scan on a grid of
    thick coronal slices (4 mm along A-P) reads that plane itself."""
    from napari_vaeloc.engine import _fusion_companions, _outside_slabs

    model, vol = t1
    res = localize(vol, model, EngineOptions(device="cpu"), maps=MAPS, slab_plane="coronal")
    assert res.fused_axes == ("axial", "sagittal"), res.fused_axes
    assert any(n.startswith("t1-brain-coronal left out of the fusion") for n in res.notes)
    companions = _fusion_companions(model, None, None, ["kl_grad"])
    assert _outside_slabs(companions, "axial") == (companions, [])  # the model's own axis
    kept, [note] = _outside_slabs(companions, "sagittal")
    assert [c.card.axis for c in kept] == ["coronal"] and note.startswith("t1-brain-sagittal")
    # pairs of coronal slices averaged: 2 x 2 x 4 mm, the A-P axis the second of this grid
    assert np.argmax(np.abs(vol.affine[:3, 1])) == 1
    n = vol.shape[1] // 2 * 2
    data = vol.data[:, :n].reshape(vol.shape[0], n // 2, 2, vol.shape[2]).mean(axis=2)
    affine = vol.affine.copy()
    affine[:3, 1] *= 2
    thick = localize(Volume.from_array(data, affine), model, EngineOptions(device="cpu"),
                     maps=MAPS, prepare=None)  # fmt: skip
    assert thick.fused_axes == ("axial", "sagittal"), thick.notes
    # a raw head in 4 mm coronal slices, prepared: the plane is read from the scan as loaded,
    # not from its brain resampled onto the template's 2 mm grid
    head = load_volume(sample_path("t1-head"))
    ap = int(np.argmax(np.abs(head.affine[1, :3])))  # the voxel axis along the world's A-P
    n = head.shape[ap] // 2 * 2
    kept = np.take(head.data, np.arange(n), axis=ap)
    shape = list(kept.shape)
    shape[ap : ap + 1] = [n // 2, 2]
    affine = head.affine.copy()
    affine[:3, ap] *= 2
    slabs = Volume.from_array(kept.reshape(shape).mean(axis=ap + 1), affine)
    prepared = localize(slabs, model, EngineOptions(device="cpu"))  # the default maps
    assert prepared.prepared is not None and prepared.fused_axes == ("axial", "sagittal")
    # the mask line and the panel's threshold line say its rates were measured fused; not
    # for the same result without the note
    from napari_vaeloc._widget_controller import Session
    from napari_vaeloc.cli.localize import describe_mask
    from napari_vaeloc.combine import PostProcessor

    said = "these rates were measured with every slicing axis fused, see the note"
    assert said in describe_mask(PostProcessor(prepared), 1.0, 1, prepared.notes)
    assert said in Session(prepared).threshold_text()
    plain = dataclasses.replace(prepared, notes=[n for n in prepared.notes if "left out" not in n])
    assert said not in describe_mask(PostProcessor(plain), 1.0, 1, plain.notes)
    assert said not in Session(plain).threshold_text()


def test_a_single_slice_is_scored_along_its_plane_alone(t1):
    """A 2D image is one slice: the other axes' models would score rows one voxel wide, so
    it is not fused (and fusion asked for is refused), and the notes agree."""
    model, vol = t1
    plane = Volume.from_array(np.ascontiguousarray(vol.data[:, vol.shape[1] // 2, :]))
    res = localize(plane, model, EngineOptions(device="cpu"), maps=MAPS, prepare=None)
    assert not res.fused_axes and not any("averaged" in n for n in res.notes), res.notes
    assert any("single slice cannot be fused" in n for n in res.notes), res.notes
    assert not any("fusion off" in n for n in res.notes), res.notes
    assert int(np.isfinite(res.slice_scores["kl"]).sum()) == 1  # one slice scored
    with pytest.raises(InputError, match="it cannot be fused"):
        localize(plane, model, EngineOptions(device="cpu"), maps=MAPS, prepare=None, fuse=True)


def _copies(tmp_path, drop_scale: str | None = None, excess: bool = True):
    """t1-brain and its companions copied side by side into ``tmp_path`` under other names
    (a card finds companions that are not bundled names beside it); the coronal companion's
    calibration without ``drop_scale``, and the main card's healthy range's excess set to
    ``excess``."""
    import json
    import shutil

    from napari_vaeloc.models.store import bundled_models

    folders = bundled_models()
    for name in ("t1-brain", "t1-brain-coronal", "t1-brain-sagittal"):
        shutil.copytree(folders[name], tmp_path / f"my-{name}")
    card = tmp_path / "my-t1-brain-coronal" / "model.json"
    data = json.loads(card.read_text())
    if drop_scale is not None:
        del data["calibration"]["scales"][drop_scale]
    card.write_text(json.dumps(data))
    main = tmp_path / "my-t1-brain" / "model.json"
    data = json.loads(main.read_text())
    data["intensity_excess"] = excess
    data["defaults"]["fuse_with"] = ["my-t1-brain-coronal", "my-t1-brain-sagittal"]
    main.write_text(json.dumps(data))
    return load_model(tmp_path / "my-t1-brain")


def test_a_map_a_companion_was_not_calibrated_for_is_not_fused(t1, tmp_path, monkeypatch):
    """A companion without a calibrated scale for a map the model has one for cannot put it on
    the model's scale: fusing it is refused in one line, before anything is scored or
    prepared; maps both know still fuse."""
    _, vol = t1
    model = _copies(tmp_path, drop_scale="restoration")
    assert "restoration" in model.card.defaults.weights
    with pytest.raises(InputError, match="cannot fuse restoration with the companion"):
        localize(vol, model, EngineOptions(device="cpu"))
    with pytest.raises(InputError, match=r"both know combi, .*rec_error_smooth") as refused:
        localize(vol, model, EngineOptions(device="cpu"), maps=("restoration",), fuse=True)
    assert "restoration" not in str(refused.value).split("both know")[1]
    # refused before the preparation (a raw head would take tens of seconds to prepare)
    stages: list[str] = []
    head = load_volume(sample_path("t1-head"))
    options = EngineOptions(device="cpu", stage=stages.append)
    with pytest.raises(InputError, match="cannot fuse restoration"):
        localize(head, model, options, prepare="auto")
    assert stages == []
    # the same options report the preparation's stages (none cached in this process)
    from collections import OrderedDict

    from napari_vaeloc import prepare

    monkeypatch.setattr(prepare, "_CACHE", OrderedDict())
    localize(vol, model, options, maps=("rec_error_smooth",), prepare="auto")
    assert prepare.STAGES[0] in stages and "scoring slices" in stages, stages


def test_every_axis_adds_the_main_models_healthy_range_excess(t1, tmp_path):
    """The companions carry no template: the healthy range's excess the model adds to its
    restoration map is added to theirs from the model's template, so that the three axes
    measure the same thing; with the model's excess off, none of them adds it."""
    model, vol = t1
    assert model.card.preprocessing.intensity_excess
    assert not load_model("t1-brain-coronal").card.preprocessing.template
    data = vol.data.copy()
    brain = data > np.percentile(data[data > 0], 60)
    centre = np.array(np.nonzero(brain)).mean(axis=1).astype(int)
    x, y, z = np.ogrid[tuple(slice(0, n) for n in data.shape)]
    ball = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= 4**2
    data[ball] = data[brain].max() * 1.6  # brighter than any healthy tissue
    bright = Volume.from_array(data, vol.affine)
    plain = _copies(tmp_path, excess=False)

    def in_ball(m, fuse: bool) -> float:
        cpu = EngineOptions(device="cpu")
        res = localize(bright, m, cpu, maps=("restoration",), fuse=fuse, prepare=None)
        return float(res.maps["restoration"][ball].mean())

    gain_fused = in_ball(model, True) - in_ball(plain, True)
    # were the excess only the axial model's, the fused gain would be a third of the axial's
    gain_axial = in_ball(model, False) - in_ball(plain, False)
    assert gain_axial > 0 and gain_fused > 0.6 * gain_axial, (gain_fused, gain_axial)


def test_t1_brain_outlines_its_mask_on_the_unsmoothed_map():
    """The bundled T1 default finds a lesion on its 6 mm smoothed map and draws the edge on the
    unsmoothed one (results.md, "The outline drawn on the unsmoothed map"): on the bundled raw
    head with a lesion it fits at least as well as the outline on the smoothed map."""
    from napari_vaeloc.combine import CombineSettings, PostProcessor

    model = load_model("t1-brain")
    d = model.card.defaults
    assert (d.outline_smoothing_mm, d.outline_fraction, d.smoothing_mm) == (0.0, 0.3, 6.0)
    vol = load_volume(sample_path("t1-head-lesion"))
    truth = np.asarray(load_volume(sample_path("t1-head-lesion-truth")).data) > 0
    res = localize(vol, model, EngineOptions(device="cpu"), maps=("restoration",))
    post = PostProcessor(res)
    sharp = CombineSettings.from_card(model.card)
    wide = sharp.replace(outline_smoothing_mm=None, outline_fraction=0.4)  # the card before

    def dice(m):
        m = m > 0
        return 2 * (m & truth).sum() / (m.sum() + truth.sum())

    new, old = post.mask(sharp), post.mask(wide)
    assert (new != old).any()
    assert dice(new) >= dice(old) > 0.8, (dice(new), dice(old))
    # the same parts: the smoothed map still decides where a lesion is
    assert (new.astype(bool) <= (post.combined(sharp) > d.grow_threshold)).all()
