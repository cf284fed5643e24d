"""A T2-weighted version of a real T1 head, tissue by tissue, for the individual benchmark.

No real individual whole-brain T2 head ships in a package the preparation accepts
(``docs/results.md``), so the T2 table would otherwise rest on population averages only. This
gives one real individual anatomy (the folds, ventricles and skull of one person) in T2
contrast: each voxel's T1 intensity, bias-field corrected, is mapped to the signal its tissue
gives in a T2-weighted fast spin echo, and the head's own bias field is put back.

Relative T2 signal levels (1 = CSF), chosen so that (CSF - WM) / (GM - WM) = 3.6, inside the
3-6 that T2 relaxation gives for a T2-weighted spin echo (TE about 100 ms, TR about 4 s;
CSF T2 about 2 s, grey matter about 100 ms, white matter about 70 ms at 3 T): CSF 1.0, grey
matter 0.55, white matter 0.38; outside the brain bone and air 0.02, muscle 0.25, fat 0.7-0.8
(bright in fast spin echo, as in T1), and the CSF between brain and skull (dark in T1)
bright within 3 mm of the brain.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..io import Volume

#: T1 intensity relative to white matter -> T2 signal, inside the brain; the CSF and grey
#: matter anchors are the brain's own tissue levels (three-class k-means,
#: :func:`napari_vaeloc.training.individuals.tissue_classes`)
T2_BRAIN = {"csf": 1.0, "gm": 0.55, "wm": 0.38}
#: T1 intensity relative to the brain's white matter -> T2 signal, outside the brain (bone and
#: air, muscle and skin, fat)
T2_HEAD = ((0.0, 0.3, 0.6, 0.9, 1.2, 1.6), (0.02, 0.05, 0.25, 0.35, 0.7, 0.8))
#: the CSF between brain and skull: within this distance of the brain (mm)
EXTRA_AXIAL_CSF_MM = 3.0
#: T2 signal of 1.0 is stored as this value
T2_SCALE = 1000.0
#: the fewest brain voxels the tissue levels are found from
MIN_BRAIN_VOXELS = 100


def t2_weighted_head(volume: Volume, brain: np.ndarray) -> Volume:
    """``volume`` (a T1 head with skull) in T2-weighted contrast.

    Args:
        volume: the T1 head, (X, Y, Z), any units.
        brain: bool, ``volume``'s shape: its brain mask.

    Returns:
        A new volume on ``volume``'s grid and affine, float32, CSF at about :data:`T2_SCALE`:
        the N4-corrected T1 mapped piecewise linearly through :data:`T2_BRAIN` (inside
        ``brain``) and :data:`T2_HEAD` (outside, with the CSF within
        :data:`EXTRA_AXIAL_CSF_MM` of the brain made bright), times the head's N4 field.

    Raises:
        InputError: ``brain`` is not of ``volume``'s shape, or has fewer than
            :data:`MIN_BRAIN_VOXELS` voxels.
    """
    from scipy import ndimage as ndi

    from ..prepare import n4_field
    from ..training.individuals import tissue_classes

    brain = np.asarray(brain, bool)
    if brain.shape != volume.shape:
        raise InputError(f"the brain mask is {brain.shape}, the head {volume.shape}")
    if brain.sum() < MIN_BRAIN_VOXELS:
        raise InputError(f"too few brain voxels ({int(brain.sum())}) to find tissue levels")
    field = n4_field(volume, brain)
    t1 = field.correct(volume)
    csf, gm, wm = (float(c) for c in tissue_classes(t1, brain))
    u = t1 / wm
    ucsf, ugm = csf / wm, gm / wm
    inside = np.interp(
        u,
        [0.0, ucsf, ugm, 1.0, 1.3],
        [
            0.95 * T2_BRAIN["csf"],
            T2_BRAIN["csf"],
            T2_BRAIN["gm"],
            T2_BRAIN["wm"],
            0.9 * T2_BRAIN["wm"],
        ],
    )
    outside = np.interp(u, *T2_HEAD)
    # the CSF between brain and skull: as dark as CSF in T1, as bright as CSF in T2, where
    # the voxel lies near the brain; fading out over EXTRA_AXIAL_CSF_MM
    near = np.clip(
        1.0 - ndi.distance_transform_edt(~brain, sampling=volume.spacing) / EXTRA_AXIAL_CSF_MM, 0, 1
    )
    fluid = near * np.clip((ugm - u) / (ugm - ucsf), 0.0, 1.0)
    outside = outside * (1.0 - fluid) + T2_BRAIN["csf"] * fluid
    t2 = np.where(brain, inside, outside) * field.full(volume) * T2_SCALE
    return Volume(t2.astype(np.float32), volume.affine.copy(), None, None, "float32")
