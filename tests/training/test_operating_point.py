"""The default threshold's level chosen on lesions seeded into held-out healthy brains
(``vaeloc calibrate``)."""

from __future__ import annotations

import itertools
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc.cli import main
from napari_vaeloc.combine import CombineSettings, PostProcessor
from napari_vaeloc.engine import localize
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.store import bundled_models, load_model, sha256_file
from napari_vaeloc.prepare import PrepareSettings, model_template
from napari_vaeloc.samples import sample_path
from napari_vaeloc.training.builder import build_training_set
from napari_vaeloc.training.datasets import block_mean, heldout_masks
from napari_vaeloc.training.loop import fpr_table
from napari_vaeloc.training.operating_point import (
    LEVEL_SMOOTHINGS_MM,
    OUTLINE_CANDIDATES,
    SMOOTHING_CANDIDATES_MM,
    choose_operating_point,
    healthy_fpr_table,
    healthy_mask_fpr,
    healthy_scan_files,
    heldout_scans,
    outline_name,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small T1 model trained on three 6 mm copies of the bundled healthy brain (one held
    out whole) with one synthetic individual each."""
    folder = tmp_path_factory.mktemp("op")
    return _train(folder, 6.0, ["--max-steps", "6", "--val-every", "3"]), folder


def _train(folder, voxel_mm: float, steps: list[str]):
    """A small T1 model (folder/m) trained on three copies of the bundled healthy brain at
    ``voxel_mm`` (written to ``folder``, the last held out whole), one individual each."""
    vol = load_volume(sample_path("t1-healthy"))
    data, affine = block_mean(vol.data, vol.affine, vol.spacing, voxel_mm)
    sources = []
    for i, flip in enumerate((None, 0, 1)):
        d = data if flip is None else np.flip(data, flip)
        p = folder / f"healthy{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(d), affine), p)
        sources.append(str(p))
    out = folder / "m"
    args = ["train", *sources, "--out", str(out), "--modality", "T1", "--individuals", "1"]
    args += ["--val-sources", "healthy2.nii.gz", "--image-size", "16", "--z-dim", "8"]
    args += [*steps, "--seed", "0", "--quiet"]
    assert main(args) == 0
    return out


def test_calibrate_chooses_the_level_with_the_best_dice_and_records_it(trained, capsys):
    trained, folder = trained
    src = ["--sources", str(folder)]
    before = (trained / "weights.safetensors").read_bytes()
    assert main(["calibrate", str(trained), "--smoothing-mm", "2", "--fpr", "best-dice", *src]) == 0
    printed = capsys.readouterr().out
    card = load_model(trained).card
    cal, d = card.calibration, card.defaults
    records = {r["name"]: r.get("role") for r in card.provenance.training["source_records"]}
    assert records == {
        "healthy0.nii.gz": None,
        "healthy1.nii.gz": None,
        "healthy2.nii.gz": "validation and calibration only",  # held out whole
    }
    assert card.provenance.sources.endswith(
        "healthy2.nii.gz: NIfTI file [user's file] + 1 synthetic individual (validation and "
        "calibration only)"
    )
    assert cal.combined_dice and cal.combined_dice_cases == 2 * 4  # 2 held-out volumes x 4
    assert cal.smoothing_fpr is None  # levels in volume space: the default smoothing's only
    assert set(cal.combined_dice) == {"0.01", "0.005", "0.001", "0.0005", "0.0001"}
    best = max(cal.combined_dice.values())
    assert cal.combined_dice[str(d.threshold_fpr)] == best
    assert d.threshold == cal.combined_fpr[str(d.threshold_fpr)]
    assert (d.weights, d.smoothing_mm, d.scan_normalise) == ({"restoration": 1.0}, 2.0, True)
    assert f"healthy false-positive rate {d.threshold_fpr:g}" in printed
    assert (trained / "weights.safetensors").read_bytes() == before  # only the card changes
    first = json.loads((trained / "model.json").read_text())["calibration"]
    assert (
        main(["calibrate", str(trained), "--smoothing-mm", "2", "--fpr", "best-dice", *src]) == 0
    )  # seeded: same again
    assert json.loads((trained / "model.json").read_text())["calibration"] == first


def test_a_fixed_level_and_bad_options_are_handled(trained, capsys):
    trained, folder = trained
    src = ["--sources", str(folder)]
    assert main(["calibrate", str(trained), "--fpr", "0.005", "--smoothing-mm", "0", *src]) == 0
    printed = capsys.readouterr().out
    card = load_model(trained).card
    d, cal = card.defaults, card.calibration
    assert d.threshold_fpr == 0.005
    assert cal.combined_dice is None
    # the default mask outlines its parts down to the 1 % level, at 0.4 of their peak, and the
    # rate it claims is what it marks on held-out healthy brains its levels were not set on
    assert (d.grow_fpr, d.grow_threshold, d.outline_fraction) == (
        0.01,
        cal.combined_fpr["0.01"],
        0.4,
    )
    model, scans = _heldout(trained, folder)
    settings = CombineSettings.from_card(card)
    assert settings.grow_level() == d.grow_threshold
    assert cal.mask_fpr_calibration == healthy_mask_fpr(model, scans, settings, cal)
    # the rate claimed: each brain's mask with its levels read from the other brains alone
    assert cal.mask_fpr == pytest.approx(_left_out_rate(model, scans, settings, cal))
    assert f"marks {cal.mask_fpr:.3%} of the held-out healthy brain voxels" in printed
    plain = healthy_mask_fpr(model, scans, settings.replace(grow_threshold=None), cal)
    assert cal.mask_fpr_calibration != plain
    # the parts outlined on the combination at another smoothing: recorded, and the rate
    # claimed is that mask's own
    sharp = ["--outline-smoothing-mm", "1.5"]
    assert main(["calibrate", str(trained), "--fpr", "0.005", "--smoothing-mm", "0", *sharp,
                 *src]) == 0  # fmt: skip
    assert "outline" in capsys.readouterr().out
    card = load_model(trained).card
    assert card.defaults.outline_smoothing_mm == 1.5
    on_sharp = CombineSettings.from_card(card)
    assert on_sharp.sharp_outline() == 1.5
    assert card.defaults.threshold == d.threshold  # the levels are the combined map's
    sharp_rate = healthy_mask_fpr(model, scans, on_sharp, card.calibration)
    assert card.calibration.mask_fpr_calibration == sharp_rate
    # calibrated again without naming the outline (e.g. on a site's healthy scans): the card's
    # outline stays; "none" draws it on the combined map again
    assert main(["calibrate", str(trained), "--fpr", "0.005", "--smoothing-mm", "0", *src]) == 0
    kept = load_model(trained).card.defaults
    assert (kept.outline_smoothing_mm, kept.outline_fraction) == (1.5, 0.4)
    off = ["--outline-smoothing-mm", "none", "--outline-fraction", "0.5"]
    assert main(["calibrate", str(trained), "--fpr", "0.005", "--smoothing-mm", "0", *off,
                 *src]) == 0  # fmt: skip
    kept = load_model(trained).card.defaults
    assert (kept.outline_smoothing_mm, kept.outline_fraction) == (None, 0.5)
    assert main(["calibrate", str(trained), "--fpr", "0.005", "--grow-fpr", "none", *src]) == 0
    card = load_model(trained).card
    assert card.defaults.grow_threshold is None and card.defaults.outline_fraction is None
    assert card.calibration.mask_fpr_calibration == pytest.approx(plain)
    text = (trained / "model.json").read_text()
    bad_options = (
        ["--fpr", "0.02"],
        ["--fpr", "most"],
        ["--weights", "rec_error=x"],
        ["--fpr", "0.005", "--grow-fpr", "0.001"],  # not looser than the threshold's level
        ["--grow-fpr", "0.02"],
        ["--outline-fraction", "1"],
        ["--outline-smoothing-mm", "wide"],
        ["--outline-smoothing-mm", "-1"],
        ["--grow-fpr", "none", "--outline-fraction", "0.3"],  # an outline without a grow level
        ["--grow-fpr", "none", "--outline-smoothing-mm", "0"],
    )
    for bad in bad_options:
        assert main(["calibrate", str(trained), *bad, *src]) == 2
        assert "vaeloc: error:" in capsys.readouterr().err
    assert main(["calibrate", str(trained), "--weights", "no_such_map=1", *src]) == 2
    assert main(["calibrate", str(trained)]) == 2  # its training files are not found here
    assert "healthy0.nii.gz" in capsys.readouterr().err
    assert (trained / "model.json").read_text() == text  # nothing rewritten on refusal


def _left_out_rate(model, scans, settings, cal):
    """The default mask's healthy rate with each held-out brain's threshold and outline level
    read from the false-positive table of the other brains alone."""
    d = model.card.defaults
    posts, where = [], []
    for s in scans:
        res = localize(s.volume, model, maps=("restoration",), prepare=None)
        posts.append(PostProcessor(res, settings, cal))
        where.append(s.brain & res.foreground)
    values = [p.combined()[w] for p, w in zip(posts, where, strict=True)]
    flagged = total = 0
    for i, (post, w) in enumerate(zip(posts, where, strict=True)):
        table = fpr_table(np.concatenate(values[:i] + values[i + 1 :]))
        levels = settings.replace(threshold=table[str(d.threshold_fpr)],
                                  grow_threshold=table[str(d.grow_fpr)])  # fmt: skip
        flagged += int(((post.mask(levels) > 0) & w).sum())
        total += int(w.sum())
    return flagged / total


def _heldout(trained, folder, template=None):
    model = load_model(trained)
    card = model.card
    record = card.provenance.training
    sources = [str(folder / s) for s in record["sources"]]
    tset = build_training_set(sources, "T1", 1, record["config"]["seed"])
    masks = heldout_masks(tset.volumes, card.axis, card.image_size, card.normalisation,
                          record["split"])  # fmt: skip
    return model, heldout_scans(tset.volumes, masks, tset.brain_masks, template)


def test_choice_respects_the_ceiling_and_needs_held_out_scans(trained):
    trained, folder = trained
    model, scans = _heldout(trained, folder)
    assert len(scans) == 2  # the held-out source and its individual, never a training volume
    settings = CombineSettings(weights={"rec_error_smooth": 1.0})
    cal = model.card.calibration
    cal.combined_fpr = {"0.01": 0.9, "0.001": 1.5, "0.1": 0.1}
    point = choose_operating_point(model, scans, settings, cal, max_fpr=0.001)
    assert point.fpr == 0.001 and set(point.dice) == {"0.001"} and point.cases == 2 * 4
    with pytest.raises(ValueError, match="no held-out scan"):
        choose_operating_point(model, [], settings, cal)
    with pytest.raises(ValueError, match="no false-positive level"):
        choose_operating_point(model, scans, settings, cal, max_fpr=1e-6)


def test_with_a_template_the_held_out_brains_are_posed_and_prepared(trained, tmp_path):
    trained, folder = trained
    template = model_template(bundled_models()["t1-brain"], load_model("t1-brain").card)
    model, scans = _heldout(trained, folder, template)
    assert len(scans) == 2
    for s in scans:
        assert s.prepared is not None and s.brain.shape == s.volume.shape
        assert max(s.volume.spacing) == pytest.approx(6.0)  # already coarser than 2 mm
        assert not np.allclose(s.volume.affine[:3, :3] / 6.0, np.eye(3))  # a head pose
        assert s.prepared.template_mask.sum() > 0.5 * template.brain_mask.sum()  # found it
    settings = CombineSettings(weights={"rec_error_smooth": 1.0}, smoothing_mm=2.0)
    cal = model.card.calibration
    table = healthy_fpr_table(model, scans, settings, cal, PrepareSettings())
    assert list(table) == ["0.1", "0.05", "0.01", "0.005", "0.001", "0.0005", "0.0001"]
    values = list(table.values())
    assert all(a <= b for a, b in itertools.pairwise(values))


def _with_template(trained, folder):
    """A copy of the small model in ``folder``, given the bundled T1 model's registration
    template."""
    shutil.copytree(trained, folder)
    bundled = load_model("t1-brain")
    card = json.loads((folder / "model.json").read_text())
    for key in ("template", "template_brain_mask"):
        name = getattr(bundled.card.preprocessing, key)
        shutil.copy(bundled.path / name, folder / name)
        card[key] = name
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def test_calibrate_chooses_the_smoothing_on_seeded_lesions(trained, tmp_path, capsys):
    """``--smoothing-mm best``: every candidate is scored at its own threshold on lesions
    seeded into the prepared held-out brains, the best one becomes the default, and the
    threshold is its table's."""
    trained, folder = trained
    src = ["--sources", str(folder)]
    # no template: nothing to prepare the held-out brains for, refused before any work
    text = (trained / "model.json").read_text()
    assert main(["calibrate", str(trained), "--smoothing-mm", "best", *src]) == 2
    assert "ships no template" in capsys.readouterr().err
    for bad in (["--smoothing-mm", "-1"], ["--smoothing-mm", "wide"],
                ["--smoothing-mm", "best", "--fpr", "best-dice"]):  # fmt: skip
        assert main(["calibrate", str(trained), *bad, *src]) == 2
        assert "vaeloc: error:" in capsys.readouterr().err
    assert (trained / "model.json").read_text() == text

    with_template = _with_template(trained, tmp_path / "m")
    assert main(["calibrate", str(with_template), "--smoothing-mm", "best", *src]) == 0
    printed = capsys.readouterr().out
    card = load_model(with_template).card
    cal, d = card.calibration, card.defaults
    scores = cal.combined_smoothing_scores
    assert set(scores) == {f"{c:g}" for c in SMOOTHING_CANDIDATES_MM}
    assert len(set(scores.values())) > 1  # the candidates differ
    best = max(scores, key=lambda k: (scores[k], float(k)))
    assert d.smoothing_mm == cal.combined_smoothing_mm == float(best)
    assert f"default smoothing: {best} mm" in printed
    # the threshold and the outline are the chosen smoothing's own levels
    model = load_model(with_template)
    template = model_template(with_template, card)
    _, scans = _heldout(with_template, folder, template)
    settings = CombineSettings(weights={"restoration": 1.0}, smoothing_mm=d.smoothing_mm,
                               scan_normalise=True)  # fmt: skip
    table = healthy_fpr_table(model, scans, settings, cal, PrepareSettings())
    assert cal.combined_fpr == pytest.approx(table)
    assert d.threshold == pytest.approx(table["0.001"])
    assert d.grow_threshold == pytest.approx(table["0.01"])
    # levels at the panel's other smoothings, read from the same brains
    others = {f"{c:g}" for c in LEVEL_SMOOTHINGS_MM if c != d.smoothing_mm}
    assert set(cal.smoothing_fpr) == others
    for sigma in (0.0, 7.0):
        if f"{sigma:g}" in others:
            at = healthy_fpr_table(model, scans, settings.replace(smoothing_mm=sigma), cal,
                                   PrepareSettings())  # fmt: skip
            assert cal.smoothing_fpr[f"{sigma:g}"] == pytest.approx(at)
            assert at != pytest.approx(table)


def test_calibrate_chooses_the_outline_on_seeded_lesions(trained, tmp_path, capsys):
    """``--outline-smoothing-mm best``: every candidate outline (the map each part's edge is
    drawn on, the fraction of its peak there) is scored by the mean Dice of the default mask
    on lesions seeded into the prepared held-out brains; the best one becomes the card's, and
    the threshold and the claimed rate are that mask's."""
    trained, folder = trained
    src = ["--sources", str(folder), "--smoothing-mm", "2"]
    text = (trained / "model.json").read_text()
    assert main(["calibrate", str(trained), "--outline-smoothing-mm", "best", *src]) == 2
    assert "ships no template" in capsys.readouterr().err  # refused before any work
    for bad in (["--outline-fraction", "0.3"], ["--fpr", "best-dice"], ["--grow-fpr", "none"]):
        assert main(["calibrate", str(trained), "--outline-smoothing-mm", "best", *bad,
                     *src]) == 2  # fmt: skip
        assert "vaeloc: error:" in capsys.readouterr().err
    assert (trained / "model.json").read_text() == text

    model_dir = _with_template(trained, tmp_path / "m")
    loose = ["--fpr", "0.01", "--grow-fpr", "0.1"]  # the small model finds lesions only so
    assert main(["calibrate", str(model_dir), "--outline-smoothing-mm", "best", *loose,
                 *src]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    card = load_model(model_dir).card
    cal, d = card.calibration, card.defaults
    scores = cal.combined_outline_scores
    names = [outline_name(*c) for c in OUTLINE_CANDIDATES]
    assert set(scores) == set(names) and len(set(scores.values())) > 1  # the candidates differ
    best = max(names, key=lambda k: scores[k])
    sharp, fraction = best.split("/")
    assert d.outline_fraction == float(fraction)
    assert d.outline_smoothing_mm == (None if sharp == "combined" else float(sharp))
    assert f"{best:<50} {scores[best]:.3f}" in printed
    # the chosen outline's mask is what the card claims for
    model = load_model(model_dir)
    _, scans = _heldout(model_dir, folder, model_template(model_dir, card))
    settings = CombineSettings.from_card(card)
    rate = healthy_mask_fpr(model, scans, settings, cal, PrepareSettings())
    assert cal.mask_fpr_calibration == pytest.approx(rate)


def test_calibrate_on_healthy_scans_as_well(trained, tmp_path, capsys):
    """``--healthy-scans``: a site's own healthy heads join the held-out brains, prepared as a
    user's scan is; the table is theirs together, and the files are recorded."""
    trained, folder = trained
    src = ["--sources", str(folder), "--smoothing-mm", "2"]
    head = sample_path("t1-head")  # a raw head with skull, 2 mm
    text = (trained / "model.json").read_text()
    # refused in one line before any work, the card untouched: no template, a missing file
    assert main(["calibrate", str(trained), *src, "--healthy-scans", str(head)]) == 2
    assert "ships no template" in capsys.readouterr().err
    model_dir = _with_template(trained, tmp_path / "m")
    card_text = (model_dir / "model.json").read_text()
    missing = tmp_path / "absent.nii.gz"
    assert main(["calibrate", str(model_dir), *src, "--healthy-scans", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent.nii.gz" in err[0], err
    # found unfit only once the calibration runs: with --out, the copy made is removed again
    not_a_scan = tmp_path / "notes.nii.gz"
    not_a_scan.write_text("not a scan")
    one_slice = tmp_path / "slice.nii.gz"
    slab = np.random.default_rng(0).random((32, 32), np.float32)
    nib.save(nib.Nifti1Image(slab, np.eye(4)), one_slice)
    copy = tmp_path / "site-model"
    for bad, why in (
        (not_a_scan, "healthy scan notes.nii.gz"),
        (one_slice, "a single 32x32 slice cannot"),
    ):
        argv = ["calibrate", str(model_dir), "--out", str(copy), *src, "--healthy-scans", str(bad)]
        assert main(argv) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and why in err[0], err
        assert not copy.exists()
    assert (model_dir / "model.json").read_text() == card_text
    assert (trained / "model.json").read_text() == text

    assert main(["calibrate", str(model_dir), *src]) == 0
    without = load_model(model_dir).card.calibration.combined_fpr
    # --out: a copy named after its folder is calibrated, the model given is left as it was
    card_text = (model_dir / "model.json").read_text()
    argv = ["calibrate", str(model_dir), "--out", str(copy), *src, "--healthy-scans", str(head)]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "calibrated on: held-out healthy individuals after preparation and 1 healthy scan" in (
        out.out
    )
    assert "preparing 1 healthy scan(s) ..." in out.err  # what runs, as it starts
    assert (model_dir / "model.json").read_text() == card_text
    assert main(argv) == 2 and "exists" in capsys.readouterr().err  # never overwritten
    model = load_model(copy)
    assert model.card.name == "site-model"
    model_dir = copy
    cal, d = model.card.calibration, model.card.defaults
    assert cal.combined_healthy_scans == {head.name: sha256_file(head)}
    assert "and 1 healthy scan" in cal.combined_source
    # the table is that of the held-out brains and the head together, recomputed here
    template = model_template(model_dir, model.card)
    _, scans = _heldout(model_dir, folder, template)
    extra = healthy_scan_files([head], template, PrepareSettings())
    assert extra[0].prepared.report.check("skull").value == "present"  # prepared as a head
    settings = CombineSettings(weights={"restoration": 1.0}, smoothing_mm=2.0,
                               scan_normalise=True)  # fmt: skip
    table = healthy_fpr_table(model, scans + extra, settings, cal, PrepareSettings())
    assert cal.combined_fpr == pytest.approx(table)
    assert cal.combined_fpr != pytest.approx(without)  # the head changed it
    assert d.threshold == pytest.approx(table["0.001"])


def test_calibrate_on_held_out_brains_with_grown_ventricles(tmp_path, capsys):
    """``--ventricles``: a model trained without older brains' ventricles is calibrated on its
    held-out individuals remade with them; recorded on the card, kept by a later
    recalibration unless told otherwise, and refused for a model without individuals."""
    model = _train(tmp_path, 4.0, ["--max-steps", "4", "--val-every", "2"])  # 6 mm: none grow
    sources = [str(tmp_path / f"healthy{i}.nii.gz") for i in range(3)]
    base = ["--sources", str(tmp_path), "--cache", str(tmp_path / "c")]
    assert main(["calibrate", str(model), *base]) == 0  # a card never calibrated: 8 mm
    assert load_model(model).card.defaults.smoothing_mm == 8.0
    src = [*base, "--smoothing-mm", "2"]
    assert main(["calibrate", str(model), *src]) == 0
    plain = load_model(model).card.calibration
    assert plain.heldout_ventricles_mm is None
    grown = tmp_path / "grown"
    assert main(["calibrate", str(model), "--out", str(grown), *src, "--ventricles", "12"]) == 0
    assert "calibrated on: held-out healthy voxels, volume space (ventricles grown by up to " \
        "12 mm)" in capsys.readouterr().out  # fmt: skip
    cal = load_model(grown).card.calibration
    assert cal.heldout_ventricles_mm == 12.0
    # the held-out brains changed: their maps' healthy scales and the threshold's table
    assert cal.scales != pytest.approx(plain.scales)
    assert cal.combined_fpr != pytest.approx(plain.combined_fpr)
    # a later recalibration keeps the card's ventricles and smoothing; 0 goes back to the
    # training record's held-out brains
    assert main(["calibrate", str(grown), *base]) == 0
    again = load_model(grown).card.calibration
    assert again.heldout_ventricles_mm == 12.0 and again.combined_smoothing_mm == 2.0
    assert again.combined_fpr == pytest.approx(cal.combined_fpr)
    assert main(["calibrate", str(grown), *src, "--ventricles", "0"]) == 0
    back = load_model(grown).card.calibration
    assert back.heldout_ventricles_mm is None
    assert back.combined_fpr == pytest.approx(plain.combined_fpr)
    # bad input: one line, nothing written
    card_text = (grown / "model.json").read_text()
    for bad in ("-1", "nan", "inf"):
        capsys.readouterr()
        assert main(["calibrate", str(grown), *src, "--ventricles", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--ventricles must be a distance of 0 mm or more" in err[0], err
    assert (grown / "model.json").read_text() == card_text
    bare = tmp_path / "bare"
    args = ["train", *sources, "--out", str(bare), "--modality", "T1", "--image-size", "16"]
    args += ["--z-dim", "8", "--max-steps", "2", "--val-every", "2", "--seed", "0", "--quiet"]
    assert main(args) == 0
    copy = tmp_path / "bare-copy"
    argv = ["calibrate", str(bare), "--out", str(copy), *src, "--ventricles", "5"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained without any" in err[0], err
    assert not copy.exists()


def test_a_recalibration_keeps_the_cards_beyond_template(trained, tmp_path, capsys):
    """``--beyond-template`` is recorded on the card and kept by a later recalibration (as the
    smoothing is) until ``--no-beyond-template``."""
    trained, folder = trained
    model_dir = _with_template(trained, tmp_path / "m")
    src = ["--sources", str(folder)]
    argv = ["calibrate", str(model_dir), *src, "--smoothing-mm", "2", "--beyond-template"]
    assert main(argv) == 0
    first = load_model(model_dir).card.calibration
    assert first.combined_beyond_template is True
    assert first.combined_source.endswith("scored beyond the template's brain too")
    assert main(["calibrate", str(model_dir), *src]) == 0
    again = load_model(model_dir).card.calibration
    assert again.combined_beyond_template is True and again.combined_smoothing_mm == 2.0
    assert again.combined_fpr == pytest.approx(first.combined_fpr)
    assert main(["calibrate", str(model_dir), *src, "--no-beyond-template"]) == 0
    plain = load_model(model_dir).card.calibration
    assert plain.combined_beyond_template is None
    assert "beyond" not in plain.combined_source
    assert "calibrated on: held-out healthy individuals after preparation" in (
        capsys.readouterr().out
    )
