"""Real contrast-enhanced T1 heads with real lesions (pyradiomics' test scans): written as scan /
mask pairs in their own geometry, and named as contrast-enhanced by the preparation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc.errors import InputError
from napari_vaeloc.evaluation.individual import downloads_folder
from napari_vaeloc.evaluation.real_lesions import PYRADIOMICS, SCANS, write_scan_pairs
from napari_vaeloc.evaluation.scan_pairs import find_pairs
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.store import cached_model
from napari_vaeloc.prepare import PrepareSettings, model_template, prepare

pytestmark = pytest.mark.skipif(
    not list(downloads_folder().glob(PYRADIOMICS.pattern)),
    reason=f"pyradiomics {PYRADIOMICS.version} is not downloaded into {downloads_folder()}; "
    "run bash scripts/setup.sh --dev",
)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    write_scan_pairs(folder)
    return folder


def test_the_pairs_keep_the_scans_geometry_and_lesions(pairs):
    found = {p.name: p for p in find_pairs(pairs)}
    assert set(found) == set(SCANS)
    volumes = {}
    for name, pair in found.items():
        scan = nib.load(pair.scan)
        mask = np.asarray(nib.load(pair.mask).dataobj)
        assert mask.shape == scan.shape and set(np.unique(mask)) == {0, 1}
        assert np.allclose(nib.load(pair.mask).affine, scan.affine)
        assert np.allclose(scan.header.get_zooms(), (0.78125, 0.78125, 6.5))
        # left-right flipped and axial slices, as the NRRD's direction says
        assert nib.aff2axcodes(scan.affine) == ("L", "A", "S")
        volumes[name] = mask.sum() * np.prod(scan.header.get_zooms()) / 1000
    assert volumes["pyradiomics-brain1"] == pytest.approx(16.4, abs=0.1)
    assert volumes["pyradiomics-brain2"] == pytest.approx(1.8, abs=0.1)
    stamps = {p.name: p.stat().st_mtime_ns for p in pairs.iterdir()}
    with pytest.raises(InputError, match="--overwrite"):
        write_scan_pairs(pairs)
    assert {p.name: p.stat().st_mtime_ns for p in pairs.iterdir()} == stamps


def test_a_contrast_enhanced_head_is_named_as_such(pairs):
    """Enhancing vessels and dural sinuses, which a T1 model without contrast agent marks as
    anomalies, make a real T1 head after gadolinium read as contrast-enhanced; the real head
    without it reads "ok" (tests/test_prepare.py)."""
    model = cached_model("t1-brain")
    template = model_template(model.path, model.card)
    scan = load_volume(pairs / "pyradiomics-brain2.nii.gz")
    report = prepare(scan, template, PrepareSettings(), refuse=False).report
    check = report.check("contrast agent")
    assert check is not None and check.level == "warn", report.lines()
    assert check.value >= 100 and "contrast-enhanced" in check.message
    assert "gadolinium" in check.advice
