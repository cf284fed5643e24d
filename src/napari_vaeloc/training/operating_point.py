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
levels at or below ``max_fpr``. :func:`choose_smoothing` compares 3D smoothings of the
combined map the same way, each at its own calibrated threshold. Without a template these work
on the held-out brains in model space.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..combine import CombineSettings, PostProcessor
from ..errors import InputError
from ..evaluation.metrics import Overlap, PixelAccumulator
from ..evaluation.synthetic import synthesize_anomaly
from ..io import Volume
from ..models.card import Calibration
from ..prepare import (
    Prepared,
    PrepareSettings,
    Template,
    apply_prepared,
    prepare_cached,
    too_thin,
    too_thin_reason,
)
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
#: the 3D smoothings of the combined map (Gaussian sigma, mm) :func:`choose_smoothing` compares
SMOOTHING_CANDIDATES_MM: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0, 8.0)
#: the smoothings (sigma, mm) a calibration also gives levels at (:func:`healthy_fpr_tables`,
#: ``Calibration.smoothing_fpr``): every whole millimetre of the panel's smoothing slider
LEVEL_SMOOTHINGS_MM: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
#: the outlines :func:`choose_outline` compares: (the smoothing of the map each part's edge is
#: drawn on, mm, None for the combined map itself; the fraction of the part's peak there)
OUTLINE_CANDIDATES: tuple[tuple[float | None, float], ...] = tuple(
    (sharp, fraction) for sharp in (None, 0.0, 2.0, 3.0, 4.0) for fraction in (0.3, 0.4, 0.5)
)
#: the lesion draws :func:`choose_outline` scores on (seeds of :func:`seeded_lesions`)
OUTLINE_SEEDS: tuple[int, ...] = (7, 11)


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


@dataclass(frozen=True)
class SmoothingChoice:
    """The chosen 3D smoothing and what it was chosen on.

    Attributes:
        smoothing_mm: the chosen Gaussian sigma, mm.
        scores: {sigma as a string: average precision of the combined map over every seeded
            lesion plus the mean Dice per case of the default mask} for each candidate.
        table: the chosen smoothing's false-positive table ({fpr: threshold}, as
            :func:`healthy_fpr_table` gives it).
        cases: lesioned copies scored.
    """

    smoothing_mm: float
    scores: dict[str, float]
    table: dict[str, float]
    cases: int


@dataclass(frozen=True)
class OutlineChoice:
    """The chosen outline and what it was chosen on.

    Attributes:
        outline_smoothing_mm: the smoothing of the map each part's edge is drawn on (mm; None:
            the combined map itself).
        outline_fraction: the fraction of the part's peak there.
        scores: {:func:`outline_name`: mean Dice per case of the default mask} per candidate.
        cases: lesioned copies scored.
    """

    outline_smoothing_mm: float | None
    outline_fraction: float
    scores: dict[str, float]
    cases: int


def outline_name(sharp: float | None, fraction: float) -> str:
    """A candidate outline's name in a card and a report: "combined/0.4", "0/0.3", "2/0.4"."""
    return f"{'combined' if sharp is None else f'{sharp:g}'}/{fraction:g}"


def outlined(
    settings: CombineSettings,
    table: dict[str, float],
    grow_fpr: float | None,
    outline_fraction: float,
    outline_smoothing_mm: float | None = None,
) -> CombineSettings:
    """``settings`` whose mask outlines each part down to the threshold the false-positive
    ``table`` gives the ``grow_fpr`` level, at ``outline_fraction`` of the part's peak (on the
    combination smoothed ``outline_smoothing_mm`` when given); a plain threshold when
    ``grow_fpr`` is None or not a level of the table."""
    grow = None if grow_fpr is None else table.get(str(grow_fpr))
    if grow is None:
        return settings.without_outline()
    return settings.replace(
        grow_threshold=grow,
        outline_fraction=outline_fraction,
        outline_smoothing_mm=outline_smoothing_mm,
    )


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


def healthy_scan_files(
    paths: Sequence[str | os.PathLike],
    template: Template,
    settings: PrepareSettings | None = None,
    *,
    voxel_mm: float = 2.0,
) -> list[HeldOutScan]:
    """Healthy scans from files (NIfTI; raw heads with skull or brains, in any orientation and
    position) as calibration brains next to a run's held-out ones: each is brought to about
    ``voxel_mm`` voxels, as the held-out brains are (so that every brain weighs about the same
    in a table pooled over voxels), and prepared for ``template`` as a user's scan is.

    Raises:
        InputError: a file cannot be read as a scan, or its preparation fails a fit check
            (the message names the file and the check); nothing is returned then.
    """
    from ..evaluation.individual import coarsen
    from ..io import load_volume

    out = []
    for path in paths:
        name = Path(path).name
        try:
            scan = load_volume(path)
            if not too_thin(scan.shape):
                scan = coarsen(scan, voxel_mm)
            if too_thin(scan.shape):
                raise InputError(too_thin_reason(scan.shape))
            prepared = prepare_cached(scan, template, settings, refuse=False)
        except InputError as exc:
            raise InputError(f"healthy scan {name}: {exc}") from exc
        failed = [c for c in prepared.report.checks if c.level == "fail"]
        if failed:
            why = "; ".join(f"{c.name}: {c.message}" for c in failed)
            raise InputError(f"healthy scan {name} does not fit the model ({why})")
        out.append(HeldOutScan(scan, np.asarray(prepared.brain_mask, bool), prepared, template))
    return out


def _localize(model, scan: Volume, settings: CombineSettings, prepare: PrepareSettings | None):
    from ..engine import localize

    maps = tuple(settings.used_weights())
    return localize(scan, model, maps=maps, prepare=prepare)


def _counted(s: HeldOutScan, res, truth: np.ndarray | None = None) -> np.ndarray:
    """Where a localized held-out scan's voxels count: its brain when it was prepared, else
    the brain voxels the engine scored (plus the lesion's)."""
    if s.prepared is not None:
        return s.brain
    scored = res.foreground if truth is None else res.foreground | truth
    return s.brain & scored


def seeded_lesions(
    scans: Sequence[HeldOutScan],
    prepare: PrepareSettings | None = None,
    *,
    per_scan: int = 1,
    seed: int = 0,
) -> Iterator[tuple[HeldOutScan, Volume, np.ndarray]]:
    """Lesioned copies of the held-out ``scans``: per scan, ``per_scan`` lesions of each kind
    of :data:`OPERATING_KINDS` and each radius range of :data:`OPERATING_RADII_MM`, seeded
    in the scan's own space inside its brain; a prepared scan's copy gets the scan's fitted
    preparation, unchanged. Lesion ``j`` of kind ``k`` and size ``r`` in scan ``v`` depends
    only on (seed, v, k, r, j).

    Yields:
        (the held-out scan, its lesioned copy, the lesion's bool truth on the scan's grid).
    """
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
                    yield s, scan, np.asarray(lesion.mask, bool)


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
    return healthy_fpr_tables(model, scans, settings, calibration, prepare)[settings.smoothing_mm]


def healthy_fpr_tables(
    model,
    scans: Sequence[HeldOutScan],
    settings: CombineSettings,
    calibration: Calibration,
    prepare: PrepareSettings | None = None,
    smoothings: Sequence[float] | None = None,
) -> dict[float, dict[str, float]]:
    """:func:`healthy_fpr_table` of the combined map under ``settings`` smoothed with each
    sigma of ``smoothings`` (mm; None: the settings' own): sigma -> {fpr: threshold}. Each
    scan is localized once: smoothing acts after the engine.

    Raises:
        ValueError: no scan.
    """
    if not scans:
        raise ValueError("no held-out healthy scan to calibrate on")
    sigmas = [settings.smoothing_mm] if smoothings is None else [float(c) for c in smoothings]
    values: dict[float, list[np.ndarray]] = {c: [] for c in sigmas}
    for s in scans:
        res = _localize(model, s.volume, settings, prepare if s.prepared else None)
        post = PostProcessor(res, settings, calibration)
        where = _counted(s, res)
        for c in sigmas:
            values[c].append(post.combined(settings.replace(smoothing_mm=c))[where])
    return {c: fpr_table(np.concatenate(v)) for c, v in values.items()}


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
    return mask_rates(model, scans, settings, calibration, prepare)[0]


def mask_rates(
    model,
    scans: Sequence[HeldOutScan],
    settings: CombineSettings,
    calibration: Calibration,
    prepare: PrepareSettings | None = None,
    settings_for: Callable[[dict[str, float]], CombineSettings] | None = None,
) -> tuple[float | None, float | None]:
    """The healthy false-positive rate of a mask on the brains it was calibrated on, and on
    brains it was not: (the fraction of the held-out ``scans``' brain voxels the mask under
    ``settings`` marks; the same with each scan's mask levels set on the other scans alone,
    leave one out). ``settings_for(table)`` gives the mask's settings (threshold, outline) for
    a false-positive table of the combined map under ``settings``
    (:func:`~napari_vaeloc.training.loop.fpr_table` of the other scans' brain voxels). Each
    scan is localized once, as in :func:`healthy_fpr_table`. (None, None) without scans; the
    second is None without ``settings_for`` or with one scan.
    """
    posts, counted, values = [], [], []
    for s in scans:
        res = _localize(model, s.volume, settings, prepare if s.prepared else None)
        post = PostProcessor(res, settings, calibration)
        counted.append(_counted(s, res))
        values.append(post.combined()[counted[-1]])
        posts.append(post)
    if not posts:
        return None, None

    def rate(levels: Callable[[int], CombineSettings]) -> float:
        flagged = total = 0
        for i, (post, where) in enumerate(zip(posts, counted, strict=True)):
            flagged += int(np.count_nonzero((post.mask(levels(i)) > 0) & where))
            total += int(np.count_nonzero(where))
        return flagged / total if total else math.nan

    seen = rate(lambda i: settings)
    if settings_for is None or len(posts) < 2:
        return seen, None

    def others(i: int) -> CombineSettings:
        return settings_for(fpr_table(np.concatenate(values[:i] + values[i + 1 :])))

    return seen, rate(others)


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
    for s, scan, truth in seeded_lesions(scans, prepare, per_scan=per_scan, seed=seed):
        res = _localize(model, scan, settings, prepare if s.prepared else None)
        where = _counted(s, res, truth)
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


def choose_outline(
    model,
    scans: Sequence[HeldOutScan],
    settings: CombineSettings,
    calibration: Calibration,
    prepare: PrepareSettings | None = None,
    *,
    candidates: Sequence[tuple[float | None, float]] = OUTLINE_CANDIDATES,
    seeds: Sequence[int] = OUTLINE_SEEDS,
) -> OutlineChoice:
    """Pick how the default mask outlines its parts on lesions seeded into the held-out
    ``scans``: for each candidate (the smoothing of the map the edge is drawn on, the fraction
    of the part's peak there) the mean Dice per case of the mask of ``settings`` (its threshold
    and grow level fixed) over the lesioned copies of :func:`seeded_lesions`, one draw per seed.
    Each copy is localized once; the candidates differ only after the engine.

    Returns:
        The candidate with the highest mean Dice (ties go to the earlier one), every
        candidate's score and the number of lesioned copies.

    Raises:
        ValueError: no candidate, no scan, or ``settings`` without a grow level to outline to.
    """
    if not candidates or not scans:
        raise ValueError("no outline to choose from, or no held-out scan to seed lesions in")
    if settings.grow_level() is None:
        raise ValueError("the default mask has no grow level: there is no outline to choose")
    dice: dict[tuple[float | None, float], list[float]] = {c: [] for c in candidates}
    for seed in seeds:
        for s, scan, truth in seeded_lesions(scans, prepare, seed=seed):
            res = _localize(model, scan, settings, prepare if s.prepared else None)
            where = _counted(s, res, truth)
            post = PostProcessor(res, settings, calibration)
            for sharp, fraction in candidates:
                mask = post.mask(
                    settings.replace(outline_smoothing_mm=sharp, outline_fraction=fraction)
                )
                overlap = Overlap()
                overlap.add(mask > 0, truth, where)
                dice[(sharp, fraction)].append(overlap.dice if math.isfinite(overlap.dice) else 0.0)
    scores = {c: float(np.mean(v)) for c, v in dice.items()}
    best = max(candidates, key=lambda c: scores[c])  # the first of equals
    return OutlineChoice(
        best[0], best[1], {outline_name(*c): scores[c] for c in candidates}, len(dice[best])
    )


def choose_smoothing(
    model,
    scans: Sequence[HeldOutScan],
    settings: CombineSettings,
    calibration: Calibration,
    prepare: PrepareSettings | None = None,
    *,
    fpr: float,
    grow_fpr: float | None,
    outline_fraction: float,
    candidates: Sequence[float] = SMOOTHING_CANDIDATES_MM,
    outline_smoothing_mm: float | None = None,
    per_scan: int = 1,
    seed: int = 0,
) -> SmoothingChoice:
    """Pick the 3D smoothing of the default combined map on lesions seeded into the held-out
    ``scans``, each candidate at its own calibrated threshold.

    For each candidate sigma the false-positive table is read from the held-out healthy scans
    (as :func:`healthy_fpr_table` does), the default mask is set at the ``fpr`` level's
    threshold and outlined down to the ``grow_fpr`` level at ``outline_fraction`` of each
    part's peak (on the combination smoothed ``outline_smoothing_mm`` when given; ``grow_fpr``
    None: a plain threshold). The lesioned copies of
    :func:`seeded_lesions` are then scored; a candidate's score is the average precision of
    its combined map over all of them plus the mean Dice per case of its mask, so that
    ranking and outline count alike and a medium lesion weighs as much as a large one. Each
    scan and copy is localized once: smoothing acts after the engine.

    Args:
        model: a loaded model (:class:`napari_vaeloc.models.store.LoadedModel`).
        scans: the held-out healthy scans (:func:`heldout_scans`).
        settings: the default combination (weights, normalisation, minimum size); its
            smoothing, threshold and outline are replaced per candidate.
        calibration: the model's calibration (component scales).
        prepare: the preparation settings prepared scans were fitted with.
        fpr, grow_fpr: levels of the false-positive table (see
            :data:`napari_vaeloc.training.loop.FPR_LEVELS`).
        candidates: sigmas to compare, mm.
        per_scan, seed: as in :func:`seeded_lesions`.

    Returns:
        The chosen sigma (ties go to the larger), every candidate's score, its table and the
        number of lesioned copies.

    Raises:
        ValueError: no candidate or no scan.
    """
    if not candidates:
        raise ValueError("no smoothing to choose from")
    if not scans:
        raise ValueError("no held-out scan to seed lesions in")
    tables = healthy_fpr_tables(model, scans, settings, calibration, prepare, candidates)
    chosen = {
        c: outlined(settings.replace(smoothing_mm=c, threshold=table[str(fpr)]), table,
                    grow_fpr, outline_fraction, outline_smoothing_mm)
        for c, table in tables.items()
    }  # fmt: skip
    ranking = {c: PixelAccumulator() for c in candidates}
    dice: dict[float, list[float]] = {c: [] for c in candidates}
    for s, scan, truth in seeded_lesions(scans, prepare, per_scan=per_scan, seed=seed):
        res = _localize(model, scan, settings, prepare if s.prepared else None)
        where = _counted(s, res, truth)
        post = PostProcessor(res, settings, calibration)
        for c in candidates:
            post.settings = chosen[c]
            ranking[c].add(post.combined(), truth, where)
            overlap = Overlap()
            overlap.add(post.mask() > 0, truth, where)
            dice[c].append(overlap.dice if math.isfinite(overlap.dice) else 0.0)
    scores = {c: float(ranking[c].metrics().ap) + float(np.mean(dice[c])) for c in candidates}
    best = max(candidates, key=lambda c: (scores[c], c))
    return SmoothingChoice(
        float(best), {f"{c:g}": scores[c] for c in candidates}, tables[best], len(dice[best])
    )
