"""The individual-anatomy benchmark: real test scans, disjoint from training, reproducible."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from napari_vaeloc.combine import CombineSettings
from napari_vaeloc.errors import InputError
from napari_vaeloc.evaluation.individual import (
    SIZES,
    SOURCES,
    IndividualSource,
    downloads_folder,
    fit_anatomies,
    headline_keys,
    individual_cases,
    lesions_found,
    summarize,
    training_overlap,
)
from napari_vaeloc.evaluation.runner import evaluate_cases
from napari_vaeloc.evaluation.synthetic import ANOMALY_KINDS
from napari_vaeloc.models.store import load_model
from napari_vaeloc.prepare import PrepareSettings, apply_prepared, model_template
from napari_vaeloc.samples import TEMPLATES

#: one anatomy per modality for the reduced run: (model, test anatomy)
REDUCED = {"T1": ("t1-brain", "pycortex-s1"), "T2": ("t2-brain", "spm-avg152t2")}


def test_test_anatomy_is_disjoint_from_training_sources():
    training = {(t.package, t.file) for t in TEMPLATES.values()}
    assert training_overlap() == []
    assert not {s.origin for s in SOURCES.values()} & {t.package for t in TEMPLATES.values()}
    assert not {(s.origin, s.member) for s in SOURCES.values()} & training
    # the check itself finds a source that is also a training template
    icbm = TEMPLATES["icbm-t2"]
    leak = IndividualSource("icbm-t2", "T2", "leak", icbm.package, "", member=icbm.file)
    assert training_overlap({"leak": leak}) == ["leak"]


def test_every_modality_has_test_anatomy():
    assert {s.modality for s in SOURCES.values()} == {"T1", "T2"}
    assert SOURCES["pycortex-s1"].sample == "t1-head"
    assert headline_keys("T1") == ["pycortex-s1", "spm-avg152t1", "spm-avg305t1"]


def test_the_native_1mm_head_is_the_sample_head_and_run_only_by_name():
    """pycortex-s1-1mm is the bundled 2 mm head as acquired: the same field of view in world
    space, and block-averaged the same voxels; one person, so not a second headline anatomy."""
    from napari_vaeloc.io import load_volume
    from napari_vaeloc.samples import sample_path

    source = SOURCES["pycortex-s1-1mm"]
    assert not source.headline and not source.population_average
    assert "pycortex-s1-1mm" not in headline_keys("T1")
    if not list(downloads_folder().glob(source.archive.pattern)):
        pytest.skip("the pycortex sdist is not downloaded; run bash scripts/setup.sh --dev")
    head, sample = source.load(), load_volume(sample_path("t1-head"))
    assert head.shape == (256, 256, 256) and head.spacing == (1.0, 1.0, 1.0)

    def centre(v):
        return v.affine[:3, :3] @ ((np.array(v.shape) - 1) / 2) + v.affine[:3, 3]

    np.testing.assert_allclose(centre(head), centre(sample), atol=1e-3)
    blocks = head.data.reshape(128, 2, 128, 2, 128, 2).mean(axis=(1, 3, 5))
    assert np.corrcoef(blocks.ravel(), sample.data.ravel())[0, 1] > 0.999


@pytest.fixture(scope="module", params=sorted(REDUCED))
def fitted(request):
    name, key = REDUCED[request.param]
    archive = SOURCES[key].archive
    if archive is not None and not list(downloads_folder().glob(archive.pattern)):
        pytest.skip(
            f"{archive.package} {archive.version} is not downloaded into {downloads_folder()}; "
            "run bash scripts/setup.sh --dev"
        )
    model = load_model(name)
    template = model_template(model.path, model.card)
    anatomies, skipped = fit_anatomies(model.card.modality, template, keys=[key])
    assert skipped == [] and [a.source.key for a in anatomies] == [key]
    return model, anatomies


def _reduced_run(model, anatomies, seed: int):
    settings = PrepareSettings()
    cases = individual_cases(
        anatomies, 1, sizes=("medium",), seed=seed, healthy=1, settings=settings
    )
    report = evaluate_cases(
        model,
        cases,
        maps=("rec_error",),
        settings={"default": CombineSettings.from_card(model.card)},
        group_by="group",
        device="cpu",
        prepare=settings,
    )
    return report, summarize(report, model.card.defaults.threshold, 1e-3)


def _text(rows: list[dict]) -> str:
    return json.dumps(rows, sort_keys=True)


def test_reduced_run_is_reproducible_by_seed(fitted):
    model, anatomies = fitted
    first, s1 = _reduced_run(model, anatomies, seed=3)
    second, s2 = _reduced_run(model, anatomies, seed=3)
    groups = {r["group"] for r in first.pixel_rows}
    assert groups == {f"{k} medium" for k in ANOMALY_KINDS} | {"healthy", "all"}
    # every number identical (NaN where a metric is undefined, e.g. for healthy cases)
    assert _text(first.pixel_rows) == _text(second.pixel_rows)
    assert _text(first.sample_rows) == _text(second.sample_rows)
    assert _text(s1.rows) == _text(s2.rows) and s1.healthy_fpr == s2.healthy_fpr
    assert 0.0 <= s1.healthy_fpr < 1.0
    all_default = next(r for r in s1.rows if r["group"] == "all" and r["map"] == "default")
    assert all_default["cases"] == len(ANOMALY_KINDS) + 1
    assert 0.5 < all_default["auroc"] <= 1.0  # lesions are found better than by chance
    # a pooled row's Dice at the threshold is the mask's over every voxel of the pool
    pooled = next(r for r in s1.rows if r["group"] == "all medium" and r["map"] == "default")
    counts = [first.overlaps[(f"{k} medium", "default", "foreground")] for k in ANOMALY_KINDS]
    tp, fp, fn = (sum(getattr(c, f) for c in counts) for f in ("tp", "fp", "fn"))
    assert tp > 0 and pooled["dice_at_threshold"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert math.isnan(
        next(r for r in s1.rows if r["group"] == "all medium" and r["map"] == "rec_error")[
            "dice_at_threshold"
        ]
    )  # a component map has no mask
    # lesions lie inside the brain, with radii of the size class, in the scan's own space
    case = next(individual_cases(anatomies, 1, kinds=("tumour",), sizes=("medium",), seed=3))
    lo, hi = SIZES["medium"]
    assert lo <= case.info["radius_mm"] < hi
    assert case.truth.shape == anatomies[0].volume.shape
    assert not (case.truth.astype(bool) & ~anatomies[0].brain).any()
    # another seed gives other lesions
    other = next(individual_cases(anatomies, 1, kinds=("tumour",), sizes=("medium",), seed=4))
    assert not np.array_equal(other.truth, case.truth)


def test_unknown_sizes_and_anatomy_are_refused(fitted):
    model, anatomies = fitted
    with pytest.raises(InputError, match="sizes"):
        next(individual_cases(anatomies, 1, sizes=("huge",)))
    template = anatomies[0].template
    with pytest.raises(InputError, match="unknown test anatomy"):
        fit_anatomies(model.card.modality, template, keys=["no-such-scan"])
    other = next(k for k, s in SOURCES.items() if s.modality != model.card.modality)
    with pytest.raises(InputError, match="is not"):
        fit_anatomies(model.card.modality, template, keys=[other])


def test_lesion_copies_reuse_the_fitted_preparation(fitted):
    _, anatomies = fitted
    a = anatomies[0]
    case = next(individual_cases(anatomies, 1, kinds=("intensity",), sizes=("large",)))
    applied = apply_prepared(a.prepared, case.volume, a.template)
    assert applied.transform is a.prepared.transform
    assert np.array_equal(applied.brain_mask, a.prepared.brain_mask)
    outside = ~np.asarray(case.truth, bool)
    # the clean anatomy through the applied preparation is the fitted one, voxel for voxel
    clean = apply_prepared(a.prepared, a.volume, a.template)
    assert np.allclose(clean.volume.data, a.prepared.volume.data, atol=1e-4)
    assert not np.allclose(applied.volume.data, clean.volume.data)
    assert np.array_equal(applied.corrected[outside], clean.corrected[outside])


def test_the_command_says_which_test_anatomy_got_cases(tmp_path, capsys):
    """``vaeloc evaluate individual``: every fitted test anatomy is listed with the cases it
    got, and one left without any (too few cases to go round) is named with the fix."""
    from napari_vaeloc.cli import main

    archive = SOURCES["spm-avg152t1"].archive
    if not list(downloads_folder().glob(archive.pattern)):
        pytest.skip("the SPM archive is not downloaded; run bash scripts/setup.sh --dev")
    argv = ["evaluate", "individual", "--model", "t1-brain", "--anatomies",
            "pycortex-s1,spm-avg152t1", "--kinds", "tumour", "--sizes", "medium,large", "--cases",
            "1",
            "--healthy", "1", "--maps", "default", "--device", "cpu", "--quiet",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test anatomy pycortex-s1: prepared\n" in out  # no empty brackets without warnings
    assert "cases per test anatomy: pycortex-s1 2, spm-avg152t1 0" in out
    assert "note: spm-avg152t1 got no case" in out and "--cases 3 or more reaches all\n" in out
    # a size class without a case is named too
    assert "note: size class large gets no case" in out and "--cases 2 or more reaches all" in out
    record = json.loads(next(tmp_path.glob("individual_*.json")).read_text())
    assert record["cases_per_anatomy"] == {"pycortex-s1": 2, "spm-avg152t1": 0}
    # each case's own row names the test anatomy it was made from
    with open(next(tmp_path.glob("individual_*_cases.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == ["tumour medium 0 (pycortex-s1)", "healthy 0 (pycortex-s1)"]
    assert [r["group"] for r in rows] == ["tumour medium", "healthy"]
    assert float(rows[0]["truth_ml"]) > 0 and float(rows[1]["truth_ml"]) == 0


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--sizes", "huge"], "unknown lesion sizes huge; choose from small"),
        (["--anatomies", ""], "names no"),
    ],
)
def test_bad_sizes_and_empty_anatomies_are_refused_before_preparing(
    tmp_path, capsys, monkeypatch, option, message
):
    """One line, nothing written, and no scan prepared first (preparing takes a minute)."""
    import napari_vaeloc.evaluation.individual as individual
    from napari_vaeloc.cli import main

    def must_not_prepare(*args, **kwargs):
        raise AssertionError("a scan was prepared before the options were checked")

    monkeypatch.setattr(individual, "fit_anatomies", must_not_prepare)
    argv = ["evaluate", "individual", "--model", "t2-brain", *option, "--device", "cpu",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_lesions_found_keeps_target_kinds_on_real_individuals_only():
    """What a card records: intensity and tumour lesions of the default mask on one person's
    anatomy; not the population averages, other kinds, other settings or refused cases."""

    def row(case, setting="default", ml=4.0, covered=0.3):
        group = case.rsplit(" ", 2)[0]
        return {"case": case, "group": group, "setting": setting, "truth_ml": ml,
                "covered": covered}  # fmt: skip

    rows = [
        row("tumour large 0 (pycortex-s1)", ml=30.5),
        row("intensity small 1 (pycortex-s1-t2)", ml=0.8, covered=0.0),
        row("intensity small 1 (pycortex-s1)", setting="other"),
        row("tumour medium 2 (spm-avg152t1)"),
        row("blur large 3 (pycortex-s1)"),
        row("tumour small 4 (pycortex-s1)", setting="", covered=float("nan")),  # refused
        row("healthy 0 (pycortex-s1)", ml=0.0, covered=float("nan")),
    ]
    assert lesions_found(rows) == [[30.5, 1], [0.8, 0]]
    assert lesions_found(rows, setting="other") == [[4.0, 1]]
    assert all(SOURCES[k].population_average for k in SOURCES if k.startswith("spm-"))


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--maps", "rec_error"], "score the default map"),
     (["--voxel-mm", "4"], "leave out --voxel-mm"),
     (["--kinds", "noise"], "add one of them to --kinds"),
     (["--anatomies", "spm-avg152t1,spm-avg305t1"], "names only population averages"),
     ([], "exists; give --card-out a new folder")],
)  # fmt: skip
def test_card_out_is_refused_before_preparing(tmp_path, capsys, monkeypatch, option, message):
    """``--card-out`` without the default mask at full resolution, or into an existing
    folder: one line, before any scan is prepared, and nothing written."""
    import napari_vaeloc.evaluation.individual as individual
    from napari_vaeloc.cli import main

    def must_not_prepare(*args, **kwargs):
        raise AssertionError("a scan was prepared before the options were checked")

    monkeypatch.setattr(individual, "fit_anatomies", must_not_prepare)
    existing = tmp_path / "taken"
    existing.mkdir()
    card_out = existing if not option else tmp_path / "new"
    argv = ["evaluate", "individual", "--model", "t1-brain", *option, "--device", "cpu",
            "--card-out", str(card_out), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists() and not any(existing.iterdir())


def test_card_out_records_what_the_default_mask_marked_on_the_real_head(tmp_path, capsys):
    """A copy of the model whose card holds each lesion's volume and whether the default mask
    marked it, as the case rows say; the weights unchanged; the copy loads."""
    from napari_vaeloc.cli import main
    from napari_vaeloc.models.store import read_card, resolve_model_path, sha256_file

    argv = ["evaluate", "individual", "--model", "t1-brain", "--anatomies", "pycortex-s1",
            "--kinds", "tumour,intensity", "--sizes", "large,small", "--cases", "2",
            "--healthy", "0", "--maps", "default", "--device", "cpu", "--quiet",
            "--out", str(tmp_path / "results"),
            "--card-out", str(tmp_path / "t1-recorded")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    with open(next((tmp_path / "results").glob("individual_*_cases.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    want = [[float(r["truth_ml"]), int(float(r["covered"]) > 0)] for r in rows]
    assert len(want) == 4 and {f for _, f in want} <= {0, 1}
    folder = tmp_path / "t1-recorded"
    card = read_card(folder)
    assert card.name == "t1-recorded"
    assert sorted(card.calibration.individual_lesions) == sorted(want)
    assert "4 lesions in pycortex-s1" in card.calibration.individual_source
    bundled = resolve_model_path("t1-brain")
    assert sha256_file(folder / "weights.safetensors") == sha256_file(
        bundled / "weights.safetensors"
    )
    assert card.defaults == read_card(bundled).defaults
    assert f"{folder}: the default mask marked " in out
    # the printed table: as many columns in its header as in its separator
    head, rule = (
        (tmp_path / "results" / "individual_t1-brain_summary.md").read_text().split("\n")[:2]
    )
    assert head.count("|") == rule.count("|") == 4, (head, rule)
    load_model(str(folder))  # the checksum and the card hold
