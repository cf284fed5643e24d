"""The evaluation runner with the bundled model on the bundled samples, and the seeded synthetic
benchmark end to end."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from napari_vaeloc.cli import main
from napari_vaeloc.combine import CombineSettings, PostProcessor
from napari_vaeloc.engine import EngineOptions, localize
from napari_vaeloc.errors import InputError
from napari_vaeloc.evaluation.runner import (
    Case,
    evaluate_cases,
    parse_map_names,
    rows_to_csv,
    rows_to_markdown,
    score_cases,
)
from napari_vaeloc.io import load_volume
from napari_vaeloc.mapnames import EVALUATED_MAPS
from napari_vaeloc.models.store import load_model
from napari_vaeloc.samples import sample_path


@pytest.fixture(scope="module")
def t2():
    return load_model("t2-brain")


@pytest.fixture(scope="module")
def lesion():
    return load_volume(sample_path("t2-lesion")), load_volume(sample_path("t2-lesion-truth")).data


def test_regions_groups_and_healthy_cases(t2, lesion):
    scan, truth = lesion
    healthy = load_volume(sample_path("t2-healthy"))
    res = localize(scan, t2, EngineOptions(device="cpu"), prepare=None)  # as the runner
    ax = res.slice_axis
    t = truth > 0
    # a slab of slices through part of the lesion
    hit = np.flatnonzero(t.any(axis=tuple(a for a in range(3) if a != ax)))
    lo, hi = int(hit[len(hit) // 2]), int(hit[-1]) + 4
    slab = np.zeros(scan.shape, bool)
    slab[(slice(None),) * ax + (slice(lo, hi),)] = True
    cases = [
        Case(scan, truth, {"kind": "lesion", "name": "a"}, region=slab),
        Case(healthy, np.zeros(healthy.shape, np.uint8), {"kind": "healthy"}),
        Case(scan, truth, {"kind": "lesion"}, region=np.zeros(scan.shape, bool)),  # skipped
    ]
    done: list[int] = []
    rep = evaluate_cases(
        t2,
        iter(cases),
        maps=("rec_error_smooth", "kl_grad"),
        device="cpu",
        examples=3,
        progress=done.append,
    )
    assert done == [1, 2, 3]
    assert rep.maps == ["rec_error_smooth", "kl_grad", "default"]
    rows = {(r["group"], r["map"], r["region"]): r for r in rep.pixel_rows}
    assert {k[0] for k in rows} == {"lesion", "healthy", "all"}
    fg = (res.foreground | t) & slab
    a = rows[("lesion", "kl_grad", "foreground")]
    assert (a["cases"], a["positives"], a["voxels"]) == (1, int((t & slab).sum()), int(fg.sum()))
    assert rows[("lesion", "kl_grad", "image")]["voxels"] == int(slab.sum())
    every = rows[("all", "default", "image")]
    assert every["voxels"] == int(slab.sum()) + healthy.data.size
    assert every["cases"] == 2
    # healthy alone: no anomalous voxel, so NaN, and a note says why
    assert math.isnan(rows[("healthy", "default", "foreground")]["auroc"])
    assert any("healthy, foreground: no anomalous voxels" in n for n in rep.notes)
    # the pooled counts are the sum of the groups'
    acc = rep.accumulators
    key = ("rec_error_smooth", "foreground")
    pooled = acc[("lesion", *key)] + acc[("healthy", *key)]
    assert np.array_equal(acc[("all", *key)].pos, pooled.pos)
    assert np.array_equal(acc[("all", *key)].neg, pooled.neg)
    # Dice at the threshold is the default mask's, inside the region
    settings = CombineSettings.from_card(t2.card)
    mask = PostProcessor(res, settings).mask()
    m = mask.astype(bool) & fg
    want = 2 * (m & t).sum() / (m.sum() + (t & fg).sum())
    got = rows[("lesion", "default", "foreground")]
    assert got["dice_at_threshold"] == pytest.approx(want)
    assert got["threshold"] == settings.threshold
    assert math.isnan(rows[("lesion", "kl_grad", "foreground")]["threshold"])
    # slice level: only the scored slab slices; volume level: the healthy case is the negative
    samples = {(r["group"], r["level"], r["score"]): r for r in rep.sample_rows}
    scored = ~np.isnan(res.slice_scores["kl"])
    areas = (t & slab).sum(axis=tuple(a for a in range(3) if a != ax))
    s = samples[("lesion", "slice", "kl")]
    assert (s["n"], s["anomalous"]) == (int(scored[lo:hi].sum()), int((areas > 0)[scored].sum()))
    assert s["anomalous"] == hit[-1] - lo + 1
    v = samples[("all", "volume", "elbo_mean")]
    assert (v["n"], v["anomalous"]) == (2, 1)
    assert 0 <= v["auroc"] <= 1
    # examples: the lesion case at its largest truth area inside the slab, then the healthy one
    assert [e.name for e in rep.examples] == ["a", "1"]
    e = rep.examples[0]
    assert e.index == int(np.argmax(areas)) and lo <= e.index < hi
    assert e.truth.sum() == areas.max()
    assert set(e.maps) == {"rec_error_smooth", "kl_grad", "default"}
    md = rows_to_markdown(rep.pixel_rows + rep.sample_rows)
    assert "| all | default | foreground |" in md and "| all | volume | elbo_max |" in md
    assert rows_to_csv(rep.sample_rows).splitlines()[0] == "group,score,level,auroc,ap,n,anomalous"


def test_score_cases_and_bad_input(t2, lesion):
    scan, truth = lesion
    out = score_cases(t2, [Case(scan, truth, {})], [CombineSettings()], ("rec_error",), "cpu")
    assert set(out) == {"rec_error", "combined[0]"}
    assert out["rec_error"]["auroc"] > 0.9
    with pytest.raises(InputError, match="unknown maps"):
        evaluate_cases(t2, [], maps=("bogus",))
    with pytest.raises(InputError, match="no cases"):
        evaluate_cases(t2, [], device="cpu")
    with pytest.raises(InputError, match="truth shape"):
        evaluate_cases(t2, [Case(scan, truth[:-1], {})], device="cpu")
    assert parse_map_names("rec_error,default") == (("rec_error",), True)
    assert parse_map_names("all") == (EVALUATED_MAPS, True)
    with pytest.raises(InputError, match="choose from rec_error"):
        parse_map_names("rec_error,sparkle")


def _run(out, seed):
    args = [
        "evaluate",
        "synthetic",
        "--model",
        "t2-brain",
        "--cases",
        "1",
        "--kinds",
        "intensity,blur",
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(args) == 0
    with open(out / "synthetic_t2-brain.csv") as fh:
        return list(csv.DictReader(fh))


def test_synthetic_benchmark_is_reproducible(tmp_path, capsys):
    a = _run(tmp_path / "a", 0)
    b = _run(tmp_path / "b", 0)
    c = _run(tmp_path / "c", 1)
    assert a == b
    assert a != c
    assert {r["kind"] for r in a} == {"intensity", "blur", "all"}
    assert {r["map"] for r in a} == {*EVALUATED_MAPS, "default"}
    assert {r["region"] for r in a} == {"foreground", "image"}
    assert all(0 <= float(r["auroc"]) <= 1 for r in a)
    assert all(math.isnan(float(r["dice_at_threshold"])) == (r["map"] != "default") for r in a)
    assert (
        "| all | default | foreground |" in (tmp_path / "a" / "synthetic_t2-brain.md").read_text()
    )
    with open(tmp_path / "a" / "synthetic_t2-brain_samples.csv") as fh:
        samples = list(csv.DictReader(fh))
    assert {(r["kind"], r["level"]) for r in samples} >= {("all", "slice"), ("blur", "volume")}
    for name in ("roc", "pr", "examples"):
        assert (tmp_path / "a" / f"synthetic_t2-brain_{name}.png").stat().st_size > 1000
    assert main(["evaluate", "synthetic", "--kinds", "sparkles", "--out", str(tmp_path)]) == 2
    assert "unknown anomaly kinds" in capsys.readouterr().err


def test_example_slices_lie_in_the_model_plane_whatever_the_voxel_order():
    """A scan stored L, I, A (as FreeSurfer conforms heads): its axial example is the slice
    across the file's second axis, shown in RAS order (right and anterior increasing), and
    numbered as the file numbers it."""
    from napari_vaeloc.evaluation.runner import _example
    from napari_vaeloc.io import Volume

    lia = np.array([[-1.0, 0, 0, 10], [0, 0, 1, -20], [0, -1, 0, 30], [0, 0, 0, 1]])
    shape = (12, 10, 8)
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    truth = np.zeros(shape, bool)
    truth[3:6, 7, 2:5] = True  # most of it on the file's slice 7 along I
    truth[4, 6, 3] = True
    case = Case(Volume.from_array(data, lia), truth, {"name": "lia"})
    e = _example(case, 0, "all", "axial", truth, truth, {"map": data})
    assert (e.plane, e.axis, e.index) == ("axial", 1, 7)
    # RAS: x runs right (the file's axis 0 flipped), y anterior (the file's axis 2)
    want = data[::-1, 7, :]
    np.testing.assert_array_equal(e.image, want)
    np.testing.assert_array_equal(e.maps["map"], want)
    assert e.truth.sum() == 9
    coronal = _example(case, 0, "all", "coronal", truth, truth, {"map": data})
    assert (coronal.axis, coronal.image.shape) == (2, (12, 10))
    # ... and superior up: the file's axis 1 runs inferior, so it is flipped
    np.testing.assert_array_equal(coronal.image, data[::-1, ::-1, coronal.index])
