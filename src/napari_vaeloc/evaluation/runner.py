"""Evaluating a model on cases with known ground truth, and the seeded synthetic benchmark.

:func:`evaluate_cases` is the one runner every benchmark uses: each case is localized once, every
requested map (and the combined map of every named :class:`CombineSettings`) is counted into
:class:`~napari_vaeloc.metrics.PixelAccumulator` s per group and region, and the per-slice and
per-volume scores are kept for sample-level metrics. Pixel metrics pool every voxel of every case
of a group (as in the MOOD challenge), in two regions:

- ``foreground``: the voxels the model's normalisation counts as object, plus the truth;
- ``image``: every voxel.

Both are intersected with a case's ``region`` when it has one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..combine import CombineSettings, PostProcessor
from ..engine import EngineOptions, localize
from ..errors import InputError, MisfitError
from ..io import Volume
from ..mapnames import AXES, EVALUATED_MAPS, PIXEL_MAPS, SLICE_SCORES, check_names
from ..models.store import LoadedModel
from ..prepare import PrepareSettings
from .metrics import Overlap, PixelAccumulator, pixel_metrics, sample_metrics
from .synthetic import synthesize_anomaly

__all__ = [
    "REGIONS",
    "VOLUME_SCORES",
    "Case",
    "EvaluationReport",
    "ExampleSlice",
    "cases_to_markdown",
    "evaluate_cases",
    "parse_map_names",
    "pixel_metrics",
    "rename_group",
    "rows_to_csv",
    "rows_to_markdown",
    "score_cases",
    "synthetic_cases",
    "synthetic_kind_cases",
    "synthetic_report",
]

REGIONS = ("foreground", "image")
#: volume-level scores: means of the counted slices' scores, and the largest slice ELBO
VOLUME_SCORES = ("kl_mean", "rec_mean", "elbo_mean", "elbo_max")
ALL = "all"


@dataclass
class Case:
    """One test volume with its ground truth and what it is.

    Attributes:
        volume: the scan.
        truth: (X, Y, Z), the volume's shape; nonzero = anomalous. All zero for a healthy case.
        info: free-form description; the key named by ``group_by`` groups cases.
        region: optional bool (X, Y, Z): only voxels inside it, and only slices it touches, count.
    """

    volume: Volume
    truth: np.ndarray
    info: dict
    region: np.ndarray | None = None


@dataclass
class ExampleSlice:
    """One slice of one case for figures: the slice with the largest truth area (inside the
    region), or the one with the most foreground for a healthy case.

    image, truth (bool) and each map are 2D arrays, a 3D scan's slice in the voxel order
    closest to RAS (first axis towards the right, second towards anterior or superior);
    ``spacing`` is their pixel size in mm; ``axis`` and ``index`` number the slice as the file
    does, ``plane`` names it ("" for a 2D image).
    """

    name: str
    group: str
    axis: int
    index: int
    spacing: tuple[float, float]
    image: np.ndarray
    truth: np.ndarray
    maps: dict[str, np.ndarray]
    order: int = 0
    plane: str = ""


@dataclass
class EvaluationReport:
    """What :func:`evaluate_cases` measured.

    Attributes:
        pixel_rows: dicts with keys group, map, region, auroc, ap, best_dice, dice_at_threshold,
            flagged, threshold, cases, positives, voxels; per group, then group "all" over
            every case.
            ``threshold`` / ``dice_at_threshold``: the settings' threshold and the Dice of their
            mask; ``flagged``: the fraction of the normal voxels their mask marks (NaN for
            component maps).
        sample_rows: dicts with keys group, score, level ("slice" / "volume"), auroc, ap, n,
            anomalous.
        accumulators: (group, map, region) -> the voxel counts behind each pixel row.
        overlaps: (group, settings name, region) -> the voxel counts of the settings' mask
            against the truth behind ``dice_at_threshold`` (summed, they give the Dice of a
            pool of groups).
        examples: example slices for figures.
        maps: the evaluated map names in order (components, then the settings' names).
        notes: why some metrics are NaN.
        case_rows: one dict per case and settings (one per case without settings), in case
            order, with keys case, group, setting, truth_ml, mask_ml, dice, covered, flagged,
            fit, checks: the case's own mask (ml: millilitres on the case's grid; ``covered``:
            the fraction of the truth inside the mask, NaN for a healthy case; ``flagged``: the
            fraction of the case's normal foreground voxels the mask marks), and how its
            preparation judged the scan (``fit``: the worst check's level, "not prepared" when
            the case was scored as given; ``checks``: the checks that did not pass, as
            ``name: level (message)`` joined by "; ", then, for a case scored with fewer
            slicing axes than the threshold was calibrated with (a companion left out for
            thick slices, a single slice), the axes that were: "scored: axial and sagittal
            slices fused (...)").
    """

    pixel_rows: list[dict]
    sample_rows: list[dict]
    accumulators: dict[tuple[str, str, str], PixelAccumulator]
    examples: list[ExampleSlice] = field(default_factory=list)
    maps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    case_rows: list[dict] = field(default_factory=list)
    overlaps: dict[tuple[str, str, str], Overlap] = field(default_factory=dict)

    def curves(self, group: str = ALL, region: str = "foreground") -> dict[str, PixelAccumulator]:
        """map -> accumulator of one group and region, in map order (for ROC / PR plots)."""
        return {m: self.accumulators[(group, m, region)] for m in self.maps}


class _Group:
    """Everything counted for one group of cases."""

    def __init__(self, names: Sequence[str], masked: Sequence[str]) -> None:
        self.cases = 0
        self.pixels = {(m, r): PixelAccumulator() for m in names for r in REGIONS}
        self.overlaps = {(m, r): Overlap() for m in masked for r in REGIONS}
        self.slices: dict[str, list[np.ndarray]] = {k: [] for k in ("label", *SLICE_SCORES)}
        self.volumes: dict[str, list[float]] = {k: [] for k in ("label", *VOLUME_SCORES)}

    def add_samples(
        self,
        slice_scores: Mapping[str, np.ndarray],
        axis: int,
        inside: np.ndarray,
        region: np.ndarray | None,
    ) -> None:
        """Record one case's scored slices (those the region touches) and its volume scores;
        ``inside``: the truth within the region, bool (X, Y, Z)."""
        other = tuple(a for a in range(inside.ndim) if a != axis)
        n = inside.shape[axis]
        touched = np.ones(n, bool) if region is None else region.any(axis=other)
        use = touched & ~np.isnan(slice_scores["elbo"])
        self.slices["label"].append(inside.any(axis=other)[use])
        for k in SLICE_SCORES:
            self.slices[k].append(slice_scores[k][use].astype(np.float64))
        if use.any():
            self.volumes["label"].append(float(inside.any()))
            for k in SLICE_SCORES:
                self.volumes[f"{k}_mean"].append(float(np.mean(slice_scores[k][use], dtype=float)))
            self.volumes["elbo_max"].append(float(np.max(slice_scores["elbo"][use])))

    def merge(self, other: _Group) -> None:
        self.cases += other.cases
        for k, acc in other.pixels.items():
            self.pixels[k] += acc
        for k, ov in other.overlaps.items():
            self.overlaps[k] += ov
        for k, v in other.slices.items():
            self.slices[k] += v
        for k, w in other.volumes.items():
            self.volumes[k] += w


class _ExamplePicker:
    """Keeps up to ``n`` example slices: anomalous cases first, one group each while groups are
    unseen, then healthy cases to fill."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.anomalous: list[ExampleSlice] = []
        self.healthy: list[ExampleSlice] = []

    def slot(self, group: str, anomalous: bool) -> int | None:
        """Where a case's example would go (None: not wanted)."""
        keep = self.anomalous if anomalous else self.healthy
        if len(keep) < self.n:
            return len(keep)
        groups = [e.group for e in keep]
        if not anomalous or group in groups:
            return None
        return next((i for i in reversed(range(len(keep))) if groups.count(groups[i]) > 1), None)

    def put(self, slot: int, anomalous: bool, example: ExampleSlice) -> None:
        keep = self.anomalous if anomalous else self.healthy
        keep[slot : slot + 1] = [example]

    def result(self) -> list[ExampleSlice]:
        return (
            sorted(self.anomalous, key=lambda e: e.order)
            + self.healthy[: max(0, self.n - len(self.anomalous))]
        )


def _case_name(case: Case, i: int) -> str:
    return str(case.info.get("name", case.info.get("case", i)))


def _slice(a: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.ascontiguousarray(np.take(a, index, axis=axis))


def _example(
    case: Case,
    i: int,
    group: str,
    plane: str,
    shown: np.ndarray,
    truth: np.ndarray,
    scored: Mapping[str, np.ndarray],
) -> ExampleSlice:
    """The ``plane`` ("axial", "coronal", "sagittal": the model's slicing axis) slice with the
    most ``shown`` voxels (bool, the scan's grid). A 3D scan is first turned to the voxel order
    closest to RAS (flips and axis swaps from its affine, nothing resampled), so that every
    example lies in the same plane and reads the same way up whatever the file's voxel order
    (a scan stored L, I, A would otherwise show coronal slices upside down)."""
    arrays = {"data": case.volume.data, "shown": shown, "truth": truth, **scored}
    spacing = tuple(case.volume.spacing)
    if shown.ndim == 3:
        import nibabel as nib

        ornt = nib.orientations.io_orientation(np.asarray(case.volume.affine))
        arrays = {k: nib.orientations.apply_orientation(v, ornt) for k, v in arrays.items()}
        ras = [0.0] * 3
        for j, (to, _) in enumerate(ornt):
            ras[int(to)] = spacing[j]
        spacing = tuple(ras)
        axis = AXES[plane]
    else:  # one slice: its own plane
        axis = int(np.argmin(shown.shape))
    other = tuple(a for a in range(arrays["shown"].ndim) if a != axis)
    idx = int(np.argmax(arrays["shown"].sum(axis=other)))
    file_axis, file_index = axis, idx  # the slice as the file numbers it
    if shown.ndim == 3:
        file_axis = int(np.flatnonzero(ornt[:, 0] == axis)[0])
        if ornt[file_axis, 1] < 0:
            file_index = shown.shape[file_axis] - 1 - idx
    return ExampleSlice(
        name=_case_name(case, i),
        group=group,
        axis=file_axis,
        index=file_index,
        plane=plane if shown.ndim == 3 else "",
        spacing=(spacing[other[0]], spacing[other[1]]),
        image=_slice(arrays["data"], axis, idx),
        truth=_slice(arrays["truth"], axis, idx),
        maps={k: _slice(arrays[k], axis, idx).astype(np.float32) for k in scored},
        order=i,
    )


def evaluate_cases(
    model: LoadedModel,
    cases: Iterable[Case],
    *,
    maps: Sequence[str] = EVALUATED_MAPS,
    settings: Mapping[str, CombineSettings] | None = None,
    group_by: str | None = "kind",
    device: str = "auto",
    examples: int = 0,
    progress: Callable[[int], None] | None = None,
    prepare: PrepareSettings | str | None = None,
) -> EvaluationReport:
    """Localize each case once and measure pixel-, slice- and volume-level detection.

    Args:
        maps: engine maps to score (names from ``mapnames.PIXEL_MAPS``).
        settings: name -> combination settings; each combined map is scored like a map under
            that name, and its mask gives the Dice at its threshold. None: the model's default
            combination as "default".
        group_by: the ``info`` key naming a case's group (missing, or None: "all").
        examples: how many example slices to keep for figures.
        progress: called with the number of cases done after each case.
        prepare: None scores cases already in the model's space as given; a preparation mode
            or settings (``engine.localize``'s ``prepare``) scores raw scans through the
            preparation stage: maps and masks are judged on the scan's grid, slice scores
            against the truth carried onto the template's grid, where the slices were scored.

    Cases are consumed one at a time (an iterator keeps one volume in memory). Healthy cases
    (all-zero truth) add normal voxels, slices and volumes. A case whose region is empty is
    skipped. A scan the preparation refuses (:class:`~napari_vaeloc.errors.MisfitError`), or
    that cannot be scored at all (any other :class:`~napari_vaeloc.errors.InputError` of the
    engine: no brain structure, too large, ...), is not scored: it gets its case row (``fit``
    "fail", ``checks`` the reason) and a note, and the other cases go on. Slice
    scores are the engine's per-slice kl, rec and elbo (unscored, empty slices are
    left out); a slice is anomalous when it holds truth inside the region.

    Raises:
        InputError: unknown map names, a truth or region of the wrong shape, or no case counted
            (every case refused: the message names each with its reason).
    """
    maps = tuple(maps)
    check_names(maps, PIXEL_MAPS, "maps")
    named = (
        {"default": CombineSettings.from_card(model.card)} if settings is None else dict(settings)
    )
    clash = set(named) & set(maps)
    if clash:
        raise InputError(f"settings names {sorted(clash)} clash with map names")
    weights = [k for s in named.values() for k in s.used_weights()]
    needed = tuple(dict.fromkeys([*maps, *weights]))
    if not needed:
        raise InputError("nothing to evaluate: no maps and no combination settings")
    names = [*maps, *named]
    groups: dict[str, _Group] = {}
    picker = _ExamplePicker(examples)
    options = EngineOptions(device=device)
    case_rows: list[dict] = []
    refused: dict[str, None] = {}
    for i, case in enumerate(cases):
        shape = case.volume.shape
        truth = np.asarray(case.truth) > 0
        if truth.shape != shape:
            raise InputError(
                f"case {_case_name(case, i)}: truth shape {truth.shape} differs from the scan's "
                f"{shape}"
            )
        region = None if case.region is None else np.asarray(case.region, bool)
        if region is not None and region.shape != shape:
            raise InputError(
                f"case {_case_name(case, i)}: region shape {region.shape} differs from the "
                f"scan's {shape}"
            )
        if region is not None and not region.any():
            if progress:
                progress(i + 1)
            continue
        group = str(case.info.get(group_by, ALL)) if group_by else ALL
        try:
            res = localize(case.volume, model, options, maps=needed, prepare=prepare)
        except InputError as exc:  # refused or unscorable: recorded, the others go on
            name = _case_name(case, i)
            misfit = isinstance(exc, MisfitError)
            why = "refused by the preparation" if misfit else "cannot be scored"
            refused[f"{name}: {why} ({exc}); not scored"] = None
            row = {"case": name, "group": group, "setting": ""}
            overlap = _case_overlap(None, truth, truth, _ml(case.volume))
            fit = _fit(exc) if misfit else {"fit": "fail", "checks": str(exc)}
            case_rows.append({**row, **overlap, **fit})
            if progress:
                progress(i + 1)
            continue
        g = groups.setdefault(group, _Group(names, list(named)))
        g.cases += 1
        fg = res.foreground | truth
        if region is not None:
            fg &= region
        where = {"foreground": fg, "image": region}
        scored = {k: res.maps[k] for k in maps}
        post = PostProcessor(res)
        fit = _fit(res.prepared)
        if post.rates_approximate():
            scored_by = f"scored: {res.slices} (the calibrated rates hold only approximately)"
            fit["checks"] = "; ".join(c for c in (fit["checks"], scored_by) if c)
        row = {"case": _case_name(case, i), "group": group}
        ml = _ml(case.volume)
        for name, s in named.items():
            post.settings = s
            c = post.combination()
            scored[name] = c.combined
            for r in REGIONS:
                g.overlaps[(name, r)].add(c.mask, truth, where[r])
            overlap = _case_overlap(c.mask, truth, fg, ml)
            case_rows.append({**row, "setting": name, **overlap, **fit})
        if not named:
            overlap = _case_overlap(None, truth, fg, ml)
            case_rows.append({**row, "setting": "", **overlap, **fit})
        for name, values in scored.items():
            for r in REGIONS:
                g.pixels[(name, r)].add(values, truth, where[r])

        inside = truth if region is None else truth & region
        if res.prepared is None:
            g.add_samples(res.slice_scores, res.slice_axis, inside, region)
        else:  # the slices were scored on the template's grid: carry truth and region there
            p = res.prepared
            onto = None if region is None else p.onto_template(region)
            g.add_samples(res.slice_scores, res.slice_axis, p.onto_template(inside), onto)
        anomalous = bool(inside.any())
        slot = picker.slot(group, anomalous)
        if slot is not None:
            shown = inside if anomalous else fg
            example = _example(case, i, group, res.axis, shown, truth, scored)
            picker.put(slot, anomalous, example)
        del res, scored
        if progress:
            progress(i + 1)
    if not groups:
        raise InputError("no cases to evaluate" + (f": {'; '.join(refused)}" if refused else ""))
    out = _report(groups, names, named, picker.result())
    out.case_rows = case_rows
    out.notes = [*refused, *out.notes]
    return out


def _ml(volume: Volume) -> float:
    """Millilitres per voxel of ``volume``."""
    return float(np.prod(volume.spacing)) / 1000.0


def _case_overlap(
    mask: np.ndarray | None, truth: np.ndarray, foreground: np.ndarray, ml: float
) -> dict:
    """One case's mask against its truth (``mask`` None: no mask; NaN columns); volumes in ml
    to the µl (voxel counts times a voxel's volume carry float noise beyond that)."""
    nan = math.nan
    n_truth = int(truth.sum())
    if mask is None:
        return dict(truth_ml=round(n_truth * ml, 3), mask_ml=nan, dice=nan, covered=nan,
                    flagged=nan)  # fmt: skip
    hit = int((mask & truth).sum())
    n_mask = int(mask.sum())
    normal = foreground & ~truth
    n_normal = int(normal.sum())
    return dict(
        truth_ml=round(n_truth * ml, 3),
        mask_ml=round(n_mask * ml, 3),
        dice=2.0 * hit / (n_mask + n_truth) if n_mask + n_truth else nan,
        covered=hit / n_truth if n_truth else nan,
        flagged=int((mask & normal).sum()) / n_normal if n_normal else nan,
    )


def _fit(prepared: object | None) -> dict:
    """How the preparation judged a case's scan (``prepared``: a
    :class:`~napari_vaeloc.prepare.Prepared`, or the :class:`MisfitError` that refused it): the
    worst check's level and the checks that did not pass (see
    :attr:`EvaluationReport.case_rows`)."""
    report = getattr(prepared, "report", None)
    if report is None:
        return {"fit": "not prepared", "checks": ""}
    failed = [f"{c.name}: {c.level} ({c.message})" for c in report.checks if c.level != "ok"]
    return {"fit": report.worst, "checks": "; ".join(failed)}


def _report(
    groups: dict[str, _Group],
    names: list[str],
    named: Mapping[str, CombineSettings],
    examples: list[ExampleSlice],
) -> EvaluationReport:
    pooled = _Group(names, list(named))
    for g in groups.values():
        pooled.merge(g)
    out = {k: v for k, v in groups.items() if k != ALL} if len(groups) > 1 else {}
    out[ALL] = pooled
    pixel_rows: list[dict] = []
    sample_rows: list[dict] = []
    accumulators: dict[tuple[str, str, str], PixelAccumulator] = {}
    notes: dict[str, None] = {}
    overlaps: dict[tuple[str, str, str], Overlap] = {}
    nan = math.nan
    for group, g in out.items():
        for name in names:
            for r in REGIONS:
                acc = g.pixels[(name, r)]
                accumulators[(group, name, r)] = acc
                m = acc.metrics()
                if m.reason:
                    notes[f"{group}, {r}: {m.reason}; pixel AUROC, AP and Dice are NaN"] = None
                ov = g.overlaps.get((name, r))
                if ov is not None:
                    overlaps[(group, name, r)] = ov
                pixel_rows.append(
                    {
                        "group": group,
                        "map": name,
                        "region": r,
                        "auroc": m.auroc,
                        "ap": m.ap,
                        "best_dice": m.best_dice,
                        "dice_at_threshold": ov.dice if ov is not None else nan,
                        "flagged": ov.fp / m.negatives if ov is not None and m.negatives else nan,
                        "threshold": float(named[name].threshold) if name in named else nan,
                        "cases": g.cases,
                        "positives": m.positives,
                        "voxels": m.positives + m.negatives,
                    }
                )
        levels = {
            "slice": (g.slices, SLICE_SCORES),
            "volume": ({k: [np.asarray(v)] for k, v in g.volumes.items()}, VOLUME_SCORES),
        }
        for level, (data, keys) in levels.items():
            labels = np.concatenate(data["label"]).astype(bool)
            for k in keys:
                sm = sample_metrics(np.concatenate(data[k]), labels)
                if sm["reason"]:
                    notes[f"{group}, {level} level: {sm['reason']}; AUROC and AP are NaN"] = None
                sample_rows.append(
                    {
                        "group": group,
                        "score": k,
                        "level": level,
                        "auroc": sm["auroc"],
                        "ap": sm["ap"],
                        "n": sm["n"],
                        "anomalous": sm["anomalous"],
                    }
                )
    return EvaluationReport(
        pixel_rows, sample_rows, accumulators, examples, list(names), list(notes),
        overlaps=overlaps,
    )  # fmt: skip


def parse_map_names(text: str) -> tuple[tuple[str, ...], bool]:
    """ "rec_error,kl_grad,default" -> (("rec_error", "kl_grad"), True): engine maps and whether
    the model's default combination is wanted. "all" = ``EVALUATED_MAPS`` and default.

    Raises:
        InputError: an unknown name (the message lists the valid ones), or none at all.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts == ["all"]:
        return EVALUATED_MAPS, True
    valid = (*PIXEL_MAPS, "default")
    unknown = [p for p in parts if p not in valid]
    if unknown or not parts:
        raise InputError(
            f"unknown maps {unknown or [text]}; choose from {', '.join(valid)} "
            "(comma-separated) or all"
        )
    return tuple(dict.fromkeys(p for p in parts if p != "default")), "default" in parts


def synthetic_cases(
    healthy: Volume, n: int, seed: int, kinds: Sequence[str] = ("tumour",)
) -> Iterator[Case]:
    """``n`` copies of ``healthy`` with one seeded anomaly each (kinds cycle in order)."""
    fg = healthy.data > healthy.data.min()
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        kind = kinds[i % len(kinds)]
        a = synthesize_anomaly(healthy.data, kind, rng, foreground=fg, spacing=healthy.spacing)
        vol = Volume(a.volume, healthy.affine, healthy.header, None, healthy.source_dtype)
        yield Case(vol, a.mask, {**a.info, "case": i, "name": f"{kind} {i}"})


def score_cases(
    model: LoadedModel,
    cases: Iterable[Case],
    settings: Sequence[CombineSettings] = (),
    components: Sequence[str] = EVALUATED_MAPS,
    device: str = "auto",
) -> dict[str, dict[str, float]]:
    """Pooled pixel metrics inside the foreground for each component and each combination
    setting ({map: {auroc, ap, best_dice}}); settings are labelled ``"combined[i]"``."""
    named = {f"combined[{i}]": s for i, s in enumerate(settings)}
    rep = evaluate_cases(
        model, cases, maps=components, settings=named, group_by=None, device=device
    )
    return {
        r["map"]: {k: r[k] for k in ("auroc", "ap", "best_dice")}
        for r in rep.pixel_rows
        if r["region"] == "foreground"
    }


def synthetic_kind_cases(
    healthy: Volume, cases_per_kind: int, kinds: Sequence[str], seed: int = 0
) -> Iterator[Case]:
    """``cases_per_kind`` seeded anomalies of each kind in turn in ``healthy`` (lazily)."""
    for k_i, kind in enumerate(kinds):
        yield from synthetic_cases(healthy, cases_per_kind, seed * 1000 + k_i, (kind,))


def synthetic_report(
    model: LoadedModel,
    healthy: Volume,
    cases_per_kind: int,
    kinds: Sequence[str],
    seed: int = 0,
    device: str = "auto",
    *,
    maps: Sequence[str] = EVALUATED_MAPS,
    settings: Mapping[str, CombineSettings] | None = None,
    examples: int = 0,
    progress: Callable[[int], None] | None = None,
) -> EvaluationReport:
    """:func:`evaluate_cases` on :func:`synthetic_kind_cases`, grouped by kind; the same seed
    gives the same report."""
    return evaluate_cases(
        model,
        synthetic_kind_cases(healthy, cases_per_kind, kinds, seed),
        maps=maps,
        settings=settings,
        group_by="kind",
        device=device,
        examples=examples,
        progress=progress,
    )


def rename_group(rows: Iterable[dict], key: str) -> list[dict]:
    """Rows with their "group" key renamed (kept first), e.g. to "kind"."""
    return [{key: r["group"], **{k: v for k, v in r.items() if k != "group"}} for r in rows]


def rows_to_csv(rows: Sequence[dict]) -> str:
    """CSV text of pixel or sample rows (columns: every key, in first-seen order)."""
    import csv
    import io

    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _fmt(v: float, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def rows_to_markdown(rows: Sequence[dict]) -> str:
    """Markdown tables: one of the pixel rows (those with a region), one of the sample rows
    (those with a level). The first column is the rows' "kind" or "group"."""
    pixel = [r for r in rows if "region" in r]
    sample = [r for r in rows if "level" in r]
    tables = []
    if pixel:
        g = "kind" if "kind" in pixel[0] else "group"
        lines = [
            f"| {g} | map | region | pixel AUROC | AP | best Dice | Dice at threshold | "
            "normal voxels marked (%) | threshold | cases | anomalous voxels | voxels |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r[g]} | {r['map']} | {r['region']} | {_fmt(r['auroc'])} | {_fmt(r['ap'])} | "
            f"{_fmt(r['best_dice'])} | {_fmt(r['dice_at_threshold'])} | "
            f"{_fmt(r.get('flagged', math.nan) * 100, '.2f')} | "
            f"{_fmt(r['threshold'], '.3g')} | {r['cases']} | {r['positives']} | {r['voxels']} |"
            for r in pixel
        ]
        tables.append("\n".join(lines))
    if sample:
        g = "kind" if "kind" in sample[0] else "group"
        lines = [
            f"| {g} | level | score | AUROC | AP | samples | anomalous |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r[g]} | {r['level']} | {r['score']} | {_fmt(r['auroc'])} | {_fmt(r['ap'])} | "
            f"{r['n']} | {r['anomalous']} |"
            for r in sample
        ]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def cases_to_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of :attr:`EvaluationReport.case_rows`: one line per case and settings,
    volumes in ml, the flagged fraction in percent, the checks that did not pass last."""
    lines = [
        "| case | group | setting | lesion ml | mask ml | Dice | lesion covered | "
        "normal voxels marked | fit | checks not passed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def percent(v: float, digits: int) -> str:
        return "n/a" if math.isnan(v) else f"{v * 100:.{digits}f} %"

    for r in rows:
        lines.append(
            f"| {r['case']} | {r['group']} | {r['setting'] or 'n/a'} | "
            f"{_fmt(r['truth_ml'], '.2f')} | {_fmt(r['mask_ml'], '.2f')} | {_fmt(r['dice'])} | "
            f"{percent(r['covered'], 0)} | {percent(r['flagged'], 2)} | {r['fit']} | "
            f"{r['checks'] or '-'} |"
        )
    return "\n".join(lines)
