"""The real head in T2-weighted contrast: the T2 table's individual anatomy."""

from __future__ import annotations

import numpy as np
import pytest

from napari_vaeloc.errors import InputError
from napari_vaeloc.evaluation.contrast import T2_SCALE, t2_weighted_head
from napari_vaeloc.evaluation.individual import SOURCES, fit_anatomies
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.store import load_model
from napari_vaeloc.prepare import model_template
from napari_vaeloc.samples import sample_path
from napari_vaeloc.training.individuals import tissue_classes


@pytest.fixture(scope="module")
def head():
    t1 = load_volume(sample_path("t1-head"))
    brain = load_volume(sample_path("t1-head-brain-mask")).data > 0
    return t1, brain, t2_weighted_head(t1, brain)


def test_tissues_take_their_t2_order(head):
    t1, brain, t2 = head
    assert t2.shape == t1.shape and np.array_equal(t2.affine, t1.affine)
    assert t2.data.dtype == np.float32 and np.isfinite(t2.data).all()
    csf, gm, wm = tissue_classes(t1.data, brain)
    assert csf < gm < wm
    # the same voxels, by their T1 class: fluid brightest, grey over white matter in T2
    x, y = t1.data[brain], t2.data[brain]
    fluid = np.median(y[x < (csf + gm) / 2])
    grey = np.median(y[np.abs(x - gm) < (wm - gm) / 4])
    white = np.median(y[x > (gm + wm) / 2])
    assert fluid > 1.5 * grey > 1.5 * white
    assert 0.5 * T2_SCALE < fluid < 1.5 * T2_SCALE
    # outside the brain and away from it, the head's darkest tissue (bone) stays dark in T2,
    # where the CSF right at the brain's edge turns bright
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(~brain, sampling=t1.spacing)
    head_ = t1.data > 0.2 * wm
    far = ~brain & (dist > 10) & ~head_ & (dist < 25)
    assert np.median(t2.data[far]) < 0.1 * T2_SCALE


def test_the_t2_head_is_taken_for_t2_and_prepared_without_a_failed_check(head):
    model = load_model("t2-brain")
    template = model_template(model.path, model.card)
    anatomies, skipped = fit_anatomies("T2", template, keys=["pycortex-s1-t2"])
    assert skipped == [] and anatomies[0].source is SOURCES["pycortex-s1-t2"]
    np.testing.assert_allclose(anatomies[0].volume.data, head[2].data, rtol=1e-5)
    report = anatomies[0].prepared.report
    scores = report.modality_scores
    assert max(scores, key=scores.get) == "T2", scores
    contrast = next(c for c in report.checks if c.name == "contrast")
    assert contrast.level == "ok", contrast.message


def test_a_brain_mask_of_another_shape_is_refused(head):
    t1, brain, _ = head
    with pytest.raises(InputError, match="brain mask"):
        t2_weighted_head(t1, brain[:-1])
    few = np.zeros_like(brain)
    few[tuple(np.argwhere(brain)[:10].T)] = True
    with pytest.raises(InputError, match="too few"):
        t2_weighted_head(t1, few)
