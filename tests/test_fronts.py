"""One pipeline, three fronts: the command line, the widget's session and the evaluation runner
give the same combined map and mask for the same scan and settings."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc._widget_controller import Session
from napari_vaeloc.cli import main
from napari_vaeloc.combine import CombineSettings
from napari_vaeloc.engine import EngineOptions, localize
from napari_vaeloc.evaluation.metrics import Overlap
from napari_vaeloc.evaluation.runner import Case, evaluate_cases
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.store import cached_model
from napari_vaeloc.samples import sample_path


def test_cli_widget_session_and_evaluation_agree(tmp_path):
    scan_path = sample_path("t2-lesion")
    truth = load_volume(sample_path("t2-lesion-truth")).data > 0
    model = cached_model("t2-brain")
    settings = CombineSettings.from_card(model.card).replace(
        weights={"rec_error_smooth": 1.0, "kl_grad": 0.5}, smoothing_mm=4.0, threshold=2.0
    )
    args = ["--weights", "rec_error_smooth=1,kl_grad=0.5", "--smoothing", "4", "--threshold", "2"]
    args += ["--prepare", "none"]  # the sample already lies in the template space
    assert main(["localize", str(scan_path), "--out", str(tmp_path), "--quiet", *args]) == 0
    stem = "sample_t2_lesion"
    cli_combined = np.asanyarray(nib.load(tmp_path / f"{stem}_combined.nii.gz").dataobj)
    cli_mask = np.asanyarray(nib.load(tmp_path / f"{stem}_mask.nii.gz").dataobj)

    volume = load_volume(scan_path)
    session = Session(localize(volume, model, EngineOptions(device="cpu"), prepare=None))
    session.settings = settings
    np.testing.assert_array_equal(session.combined(), cli_combined)
    np.testing.assert_array_equal(session.mask(), cli_mask)
    assert 0 < session.mask().sum() < session.result.foreground.sum()  # a real, partial mask

    case = Case(volume, truth.astype(np.uint8), {"name": "lesion"})
    report = evaluate_cases(
        model, [case], maps=(), settings={"s": settings}, group_by=None, examples=1
    )
    example = report.examples[0]
    want = np.take(session.combined(), example.index, axis=example.axis)
    np.testing.assert_array_equal(example.maps["s"], want)
    region = session.result.foreground | truth
    overlap = Overlap()
    overlap.add(session.mask(), truth, region)
    row = next(r for r in report.pixel_rows if r["map"] == "s" and r["region"] == "foreground")
    assert row["dice_at_threshold"] == pytest.approx(overlap.dice, abs=0)
    assert row["threshold"] == 2.0
