"""The default threshold, calibrated and chosen on held-out healthy individuals the way users'
scans are scored.

A model's false-positive table (healthy FPR -> threshold of the default combined map) says what
each threshold costs on healthy brains; which level finds lesions best is another question.
Both are answered here on the *held-out* brains of a training run (validation sources and
their synthetic individuals, which the weights never trained on; never a benchmark's test
anatomy).

When the model ships a template (:func:`napari_vaeloc.prepare.model_template`) each held-out
brain is first turned into a scan as a user would open it (:func:`heldout_scans`): coarsened to
``voxel_mm`` voxels, given a random head pose in its header (rotation up to ``POSE_DEGREES``
about each axis, shift up to ``POSE_MM``), then put through the preparation stage, which
registers it back. :func:`healthy_fpr_table` localizes every scan and reads the thresholds from
the combined map's values inside the fitted brain masks; :func:`choose_operating_point` seeds
medium and large tumour-like and intensity lesions into each scan in its own space, applies the
fitted preparation unchanged, localizes, and keeps the level whose default mask (threshold,
then minimum lesion size) reaches the best pooled Dice, 2 TP / (2 TP + FP + FN), among the
levels at or below ``max_fpr``. Without a template both work on the held-out brains in model
space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..combine import CombineSettings, PostProcessor
from ..evaluation.metrics import Overlap
from ..evaluation.synthetic import synthesize_anomaly
from ..io import Volume
from ..models.card import Calibration
from ..prepare import Prepared, PrepareSettings, Template, apply_prepared, prepare_cached
from .loop import fpr_table

#: lesion kinds and radius ranges (mm) the operating point is chosen for: the kinds and sizes
#: the plugin's default is judged on (medium and large tumour-like and intensity lesions)
OPERATING_KINDS: tuple[str, ...] = ("tumour", "intensity")
OPERATING_RADII_MM: tuple[tuple[float, float], ...] = ((8.0, 15.0), (15.0, 25.0))
#: the loosest healthy false-positive rate a default may claim
MAX_OPERATING_FPR = 0.01
#: the random head pose a held-out brain gets before preparation: degrees per axis, mm shift
POSE_DEGREES = 10.0
POSE_MM = 15.0


@dataclass
class HeldOutScan:
    """One held-out healthy brain as it is scored.

    Attributes:
        volume: the scan (model space, or its own grid and pose when ``prepared`` is set).
        brain: bool, the volume's grid: where lesions go and voxels count.
        prepared: the preparation fitted to it, or None (scored in model space).
        template: the template it was prepared for.
    """

    volume: Volume
    brain: np.ndarray
    prepared: Prepared | None = None
    template: Template | None = None


@dataclass(frozen=True)
class OperatingPoint:
    """The chosen level and what it was chosen on.

    Attributes:
        fpr: the chosen healthy false-positive rate (a key of the table, as a float).
        dice: {fpr key: pooled Dice of the default mask at that level's threshold}.
        cases: lesioned copies scored.
    """

    fpr: float
    dice: dict[str, float]
    cases: int


def random_pose(rng: np.random.Generator) -> np.ndarray:
    """A 4x4 rigid transform (world mm): rotations up to :data:`POSE_DEGREES` about x, y and
    z, then a shift up to :data:`POSE_MM` along each."""
    a = np.deg2rad(rng.uniform(-POSE_DEGREES, POSE_DEGREES, 3))
    c, s = np.cos(a), np.sin(a)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = rz @ ry @ rx
    pose[:3, 3] = rng.uniform(-POSE_MM, POSE_MM, 3)
    return pose


def heldout_scans(
    volumes: Sequence[Volume],
    masks: Sequence[np.ndarray | None],
    brains: Sequence[np.ndarray] | None,
    template: Template | None,
    settings: PrepareSettings | None = None,
    *,
    voxel_mm: float = 2.0,
    seed: int = 0,
) -> list[HeldOutScan]:
    """The held-out brains of a run as they are scored.

    Args:
        volumes: the run's volumes, in model space.
        masks: per volume, bool (X, Y, Z) of its held-out voxels, or None (used in training).
        brains: bool (X, Y, Z) brain mask per volume; None: the voxels above 0.
        template: the model's template; None scores the held-out voxels in model space.
        settings: the preparation settings (default: "auto", as the fronts use).
        voxel_mm: voxel size a held-out brain is coarsened to before preparation.
        seed: seeds the head poses.

    Returns:
        One scan per held-out volume (with a template: only volumes held out whole, whose
        preparation passes its fit checks).
    """
    from ..evaluation.individual import coarsen

    out = []
    for i, (vol, held) in enumerate(zip(volumes, masks, strict=True)):
        if held is None:
            continue
        inside = np.asarray(vol.data) > 0 if brains is None else np.asarray(brains[i], bool)
        if template is None:
            if (inside & held).any():
                out.append(HeldOutScan(vol, inside & held))
            continue
        if not held.all():
            continue
        data = np.where(inside, np.asarray(vol.data, np.float32), np.float32(0))
        small = coarsen(Volume(data, vol.affine, None, None, "float32"), voxel_mm)
        pose = random_pose(np.random.default_rng([seed, i]))
        scan = Volume(small.data, pose @ small.affine, None, None, "float32")
        prepared = prepare_cached(scan, template, settings, refuse=False)
        if any(c.level == "fail" for c in prepared.report.checks):
            continue
        brain = np.asarray(prepared.brain_mask, bool)
        out.append(HeldOutScan(scan, brain, prepared, template))
    return out


def _localize(model, scan: Volume, settings: CombineSettings, prepare: PrepareSettings | None):
    from ..engine import localize

    maps = tuple(settings.used_weights())
    return localize(scan, model, maps=maps, prepare=prepare)


def healthy_fpr_table(
    model,
    scans: Sequence[HeldOutScan],
    settings: CombineSettings,
    calibration: Calibration,
    prepare: PrepareSettings | None = None,
) -> dict[str, float]:
    """{fpr: threshold} of the combined map under ``settings`` over the brain voxels of the
    held-out ``scans``, each localized as every front does (through ``prepare`` when the
    scans were prepared).

    Raises:
        ValueError: no scan.
    """
    values = []
    for s in scans:
        res = _localize(model, s.volume, settings, prepare if s.prepared else None)
        combined = PostProcessor(res, settings, calibration).combined()
        counted = s.brain if s.prepared is not None else s.brain & res.foreground
        values.append(combined[counted])
    if not values:
        raise ValueError("no held-out healthy scan to calibrate on")
    return fpr_table(np.concatenate(values))


def healthy_mask_fpr(
    model,
    scans: Sequence[HeldOutScan],
    settings: CombineSettings,
    calibration: Calibration,
    prepare: PrepareSettings | None = None,
) -> float | None:
    """The fraction of the held-out ``scans``' brain voxels that the mask under ``settings``
    marks (threshold, outline and minimum size applied), each scan localized as in
    :func:`healthy_fpr_table`; None without scans."""
    flagged = total = 0
    for s in scans:
        res = _localize(model, s.volume, settings, prepare if s.prepared else None)
        mask = PostProcessor(res, settings, calibration).mask() > 0
        counted = s.brain if s.prepared is not None else s.brain & res.foreground
        flagged += int(np.count_nonzero(mask & counted))
        total += int(np.count_nonzero(counted))
    return flagged / total if total else None


def choose_operating_point(
    model,
    scans: Sequence[HeldOutScan],
    settings: CombineSettings,
    calibration: Calibration,
    prepare: PrepareSettings | None = None,
    *,
    per_scan: int = 1,
    seed: int = 0,
    max_fpr: float = MAX_OPERATING_FPR,
) -> OperatingPoint:
    """Pick the false-positive level of ``calibration.combined_fpr`` whose threshold gives the
    best pooled Dice on lesions seeded into the held-out ``scans``.

    Args:
        model: a loaded model (:class:`napari_vaeloc.models.store.LoadedModel`).
        scans: the held-out healthy scans (:func:`heldout_scans`).
        settings: the default combination (weights, smoothing, normalisation, minimum size);
            its threshold is replaced by each level's.
        calibration: the model's calibration with the false-positive table of ``settings``.
        prepare: the preparation settings prepared scans were fitted with.
        per_scan: lesions per kind and size class in each scan.
        seed: seeds the lesions; the same inputs give the same choice.
        max_fpr: only levels at or below this rate are candidates.

    Returns:
        The chosen level (ties go to the stricter one), the Dice of every candidate and the
        number of cases.

    Raises:
        ValueError: no false-positive table, no candidate level, or no scan.
    """
    table = {k: float(v) for k, v in (calibration.combined_fpr or {}).items()}
    levels = sorted((k for k in table if 0 < float(k) <= max_fpr), key=float)
    if not levels:
        raise ValueError(f"no false-positive level at or below {max_fpr} to choose from")
    overlaps = {k: Overlap() for k in levels}
    cases = 0
    for v_i, s in enumerate(scans):
        for k_i, kind in enumerate(OPERATING_KINDS):
            for r_i, (lo, hi) in enumerate(OPERATING_RADII_MM):
                for j in range(per_scan):
                    rng = np.random.default_rng([seed, v_i, k_i, r_i, j])
                    lesion = synthesize_anomaly(
                        np.asarray(s.volume.data, np.float32),
                        kind,
                        rng,
                        foreground=s.brain,
                        spacing=s.volume.spacing,
                        radius_mm=float(rng.uniform(lo, hi)),
                    )
                    scan = Volume(lesion.volume, s.volume.affine, None, None, "float32")
                    if s.prepared is not None and s.template is not None:
                        apply_prepared(s.prepared, scan, s.template, prepare)
                    res = _localize(model, scan, settings, prepare if s.prepared else None)
                    truth = np.asarray(lesion.mask, bool)
                    where = s.brain
                    if s.prepared is None:
                        where = (res.foreground | truth) & s.brain
                    post = PostProcessor(res, settings, calibration)
                    for level in levels:
                        post.settings = settings.replace(threshold=table[level])
                        overlaps[level].add(post.mask() > 0, truth, where)
                    cases += 1
    if not cases:
        raise ValueError("no held-out scan to seed lesions in")
    dice = {k: (ov.dice if math.isfinite(ov.dice) else 0.0) for k, ov in overlaps.items()}
    best = max(levels, key=lambda k: (dice[k], -float(k)))
    return OperatingPoint(float(best), dice, cases)
