"""The brain benchmark: held-out test anatomy, seeded cases, and `vaeloc evaluate brain` end to end
(reduced: one case per anomaly kind) with the real bundled models and templates."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from napari_vaeloc.cli import main
from napari_vaeloc.evaluation.brain_benchmark import (
    MIN_DEPTH_MM,
    benchmark_cases,
    test_anatomies,
    warp_coordinates,
)
from napari_vaeloc.evaluation.synthetic import ANOMALY_KINDS
from napari_vaeloc.models.store import bundled_models, load_model
from napari_vaeloc.training.datasets import heldout_slab_mask, load_template

test_anatomies.__test__ = False  # a library function named test_*, not a test


#: the split of a training run on the T2 template alone: 8-slice slabs held out (seed 0)
SLAB_SPLIT = {"by": "slab", "gap": 2, "seed": 0, "slab": 8, "val_fraction": 0.15}


@pytest.fixture(scope="module")
def slab_t2(tmp_path_factory):
    """The bundled T2 model's folder with the card of a run that held out slabs of the T2
    template (the bundled model itself trained on all of it)."""
    folder = tmp_path_factory.mktemp("t2") / "t2-slabs"
    shutil.copytree(bundled_models()["t2-brain"], folder)
    card = json.loads((folder / "model.json").read_text())
    card["training"]["split"] = dict(SLAB_SPLIT)
    (folder / "model.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def t2(slab_t2):
    model = load_model(slab_t2)
    return model, test_anatomies("T2", model.card, n=2, seed=0)


def test_t2_region_is_the_held_out_slabs(t2):
    model, anatomies = t2
    card = model.card
    template = load_template("icbm-t2")
    held = heldout_slab_mask(
        template, card.axis, card.image_size, card.normalisation,
        card.provenance.training["split"],
    )  # fmt: skip
    held_z = np.flatnonzero(held.any(axis=(0, 1)))  # 1 mm axial slices held out in training
    assert 0 < len(held_z) < 0.3 * held.shape[2]
    a = anatomies[0]
    assert a.volume.shape == (96, 114, 96)
    np.testing.assert_allclose(np.sqrt((a.volume.affine[:3, :3] ** 2).sum(0)), 2.0)
    # the warp tilts and bends the slabs but keeps their share of the volume
    assert abs(a.region.mean() - held.mean()) < 0.35 * held.mean()
    scored_z = np.flatnonzero(a.region.any(axis=(0, 1)))
    assert 2 * scored_z.min() > held_z.min() - 30 and 2 * scored_z.max() < held_z.max() + 30
    # anomaly centres: inside the scored region and deep inside the brain
    assert a.region[tuple(a.centres.T)].all() and a.foreground[tuple(a.centres.T)].all()
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(a.foreground, sampling=(2.0, 2.0, 2.0))
    assert depth[tuple(a.centres.T)].min() >= MIN_DEPTH_MM


def test_warps_are_seeded_and_differ(t2):
    model, anatomies = t2
    again = test_anatomies("T2", model.card, n=2, seed=0)
    np.testing.assert_array_equal(again[1].volume.data, anatomies[1].volume.data)
    assert not np.array_equal(anatomies[0].volume.data, anatomies[1].volume.data)
    c = warp_coordinates((8, 9, 10), (2.0, 2.0, 2.0), np.random.default_rng(0), 0.0, 0.0, (1, 1))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (8, 9, 10)], indexing="ij"))
    np.testing.assert_allclose(c, grid, atol=1e-4)  # no displacement, rotation or scale


def test_cases_cover_every_kind_inside_the_region(t2):
    _, anatomies = t2
    cases = list(benchmark_cases(anatomies, 1, seed=3, healthy=1))
    assert [c.info["kind"] for c in cases] == [*ANOMALY_KINDS, "healthy"]
    for c in cases[:-1]:
        assert (c.truth.astype(bool) & c.region).any(), c.info["kind"]
        assert not np.array_equal(c.volume.data, anatomies[0].volume.data)
    assert not cases[-1].truth.any()
    again = list(benchmark_cases(anatomies, 1, seed=3, healthy=1))
    for a, b in zip(cases, again, strict=True):
        np.testing.assert_array_equal(a.volume.data, b.volume.data)


def test_t1_anatomy_is_another_template():
    model = load_model("t1-brain")
    assert "icbm" in " ".join(model.card.provenance.training["sources"])
    (a,) = test_anatomies("T1", model.card, n=1, seed=0)
    assert a.region is None and a.volume.shape == (91, 109, 91)  # FSL MNI152, not ICBM 2009c
    assert 0.15 < a.foreground.mean() < 0.4


def _table(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_t2_benchmark_refuses_a_model_trained_on_the_whole_template(tmp_path, capsys):
    args = ["evaluate", "brain", "--model", "t2-brain", "--cases", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vaeloc evaluate individual" in err
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


@pytest.mark.parametrize("which", ["t2", "t1-brain"])
def test_evaluate_brain_reduced_run_is_reproducible(which, slab_t2, tmp_path, capsys):
    model = str(slab_t2) if which == "t2" else which
    stem = "t2-brain" if which == "t2" else which  # the card's name names the files
    args = ["evaluate", "brain", "--model", model, "--cases", "1", "--healthy", "1"]
    args += ["--anatomies", "1", "--maps", "rec_error_smooth,kl_grad,default", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a"), "--examples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| all |" in printed
    rows = _table(tmp_path / "a" / f"brain_{stem}.csv")
    kinds = {r["kind"] for r in rows}
    assert kinds == {*ANOMALY_KINDS, "healthy", "all"}
    overall = {r["map"]: r for r in rows if r["kind"] == "all" and r["region"] == "foreground"}
    assert set(overall) == {"rec_error_smooth", "kl_grad", "default"}
    assert int(overall["default"]["cases"]) == len(ANOMALY_KINDS) + 1
    assert 0.0 < float(overall["rec_error_smooth"]["auroc"]) < 1.0
    for f in ("_samples.csv", ".md", "_roc.png", "_pr.png", "_examples.png"):
        assert (tmp_path / "a" / f"brain_{stem}{f}").stat().st_size > 0
    assert main([*args, "--out", str(tmp_path / "b"), "--examples", "0"]) == 0
    again = _table(tmp_path / "b" / f"brain_{stem}.csv")
    assert again == rows  # same seed, same table
    assert main([*args, "--out", str(tmp_path / "a")]) == 2  # no overwrite without asking
