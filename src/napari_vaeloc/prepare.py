"""Scan preparation: bring a raw brain MRI into the space the model learned, check that it fits,
and map every result back onto the scan's own voxel grid.

Steps, each recorded in the :class:`PreparationReport` (seconds, whether it ran, why):

1. **bias-field correction**: N4 (Tustison et al., IEEE TMI 2010) from SimpleITK, estimated on a
   copy shrunk to about 6 mm inside the head (Otsu) and applied at full resolution; on a head
   with skull, fitted once more inside the extracted brain after step 2 (the scalp's fat and
   the skull pull the first fit), the two fields multiplied;
2. **brain extraction**: deepbet (Fisch et al., Comput. Biol. Med. 2024; MIT, TorchScript
   weights inside its wheel), skipped when the scan is already skull-stripped (a flat
   background around an object of brain size; overridable);
3. **registration**: a 12-parameter affine transform from the model's template to the brain,
   Mattes mutual information (50 bins), three resolutions (8, 4, 2 mm shrink with 2, 1, 0 mm
   smoothing), initialised at the centres of mass; then the brain is resampled (linear) onto
   the template's grid, where the model scores it;
4. **input-fit checks** (:class:`FitCheck`): voxel size, skull, coverage of the template's
   brain by the scan's field of view, registration quality (Dice of the carried brain mask
   with the template's), modality (correlation with each bundled model's template).
   A clear misfit raises :class:`~napari_vaeloc.errors.InputError` with what to do; a doubtful
   one is a warning in the report.

Results computed on the template grid go back through the inverse transform
(:meth:`Prepared.to_scan`: linear for maps, nearest for masks); outside the extracted brain they
are 0. Preparation is cached per scan content and settings (:func:`prepare_cached`).
:func:`apply_prepared` applies a preparation already fitted to one scan (its bias field, brain
mask, intensity offset and transform) to another scan on the same grid without refitting, e.g.
to copies of a scan with inserted lesions.

SimpleITK works in LPS world coordinates, NIfTI in RAS: :func:`to_sitk` converts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import Cancelled, InputError, MisfitError
from .fieldofview import FieldOfView, background_level, find_field_of_view
from .io import Volume, load_volume, orientation_unknown
from .mapnames import AXES
from .preprocess import CHUNK_VOXELS, bounding_box, clip_outliers, fill_holes, outlier_note

if TYPE_CHECKING:
    import SimpleITK as sitk

#: preparation modes: ``auto`` runs each step when the scan needs it, ``full`` every step,
#: ``none`` scores the scan as given (it must already look like the model's template)
PREPARE_MODES = ("auto", "full", "none")
#: stage names, as progress reports them
STAGES = ("checking the scan", "bias-field correction", "brain extraction", "registration")
#: refit N4 inside the extracted brain after brain extraction (raw heads only)
N4_BRAIN_PASS = True
#: a skull-stripped scan's object is at most this large (ml); a head with skull is larger
MAX_BRAIN_ML = 2200.0
#: an extracted brain outside this range (ml) is no brain: the scan is refused (noise, a
#: phantom, a partial scan the extraction misread); between the two ranges it is a warning
BRAIN_ML = {"ok": (800.0, 2300.0), "fail": (300.0, 3500.0)}
MIN_BRAIN_ML = BRAIN_ML["ok"][0]
#: the modality check refuses a scan that correlates with no template at least this well
MIN_MODALITY_R = {"ok": 0.4, "fail": 0.25}
#: a scan thinner than this (voxels, along any axis) cannot be registered in 3D: "auto" scores
#: it as given, "full" refuses it
MIN_PREPARE_VOXELS = 8


def too_thin(shape: tuple[int, ...]) -> bool:
    """True for a 2D image, a single slice or a slab too thin to prepare in 3D."""
    return len(shape) < 3 or min(shape) < MIN_PREPARE_VOXELS


def shape_words(shape: tuple[int, ...]) -> str:
    """An image of ``shape`` in words: "a single 256x256 slice" for a 2D image or one with a
    single voxel along an axis, else "a 256x256x6 image"."""
    plane = [n for n in shape if n != 1]
    if len(plane) == 2:
        return f"a single {'x'.join(map(str, plane))} slice"
    return f"a {'x'.join(map(str, shape))} image"


def too_thin_reason(shape: tuple[int, ...]) -> str:
    """Why an image of ``shape`` (:func:`too_thin`) is not prepared, in the fronts' words."""
    if len([n for n in shape if n != 1]) == 2:
        return f"{shape_words(shape)} cannot be prepared in 3D"
    return f"{shape_words(shape)} is too thin to prepare in 3D"


#: levels of the checks: registration (brain-mask Dice) and coverage (fraction of the
#: template's brain inside the scan's field of view); below "fail" the scan is refused
REGISTRATION_DICE = {"ok": 0.85, "fail": 0.65}
COVERAGE = {"ok": 0.95, "fail": 0.6}
VOXEL_MM = {"ok": 3.0, "fail": 7.0}
#: an image whose neighbouring voxels correlate less than this along every axis has no
#: spatial structure (noise) and is refused before any step runs. MRI of a head or brain
#: gives r 0.86-0.99 per axis, but noise lowers it, and more so the more of the field of view
#: is background: the 1 mm head with Rician noise at SNR 5, 3, 2 reads 0.83, 0.62, 0.36, and
#: at SNR 3 padded with noise to 384 cubed 0.19 (it is localized right); independent noise
#: reads near 0
MIN_NEIGHBOUR_R = 0.1
#: the template scaling check: how much the registration scaled the template along its principal
#: directions (the singular values of the transform's linear part) to fit the brain. Adult
#: brains are 1,000-1,900 ml against the template's 1,880 ml, so a whole brain needs 0.75-1.33
#: along each direction and at most 1.25 times more along one than another; a slab or a partial
#: scan is fitted by squeezing the template into it, and is refused past the "fail" limits
SCALING = {"ok": (0.75, 1.33), "fail": (0.6, 1.67)}
ANISOTROPY = {"ok": 1.25, "fail": 1.6}
#: the modality check refuses when another modality's template correlates better by this much
MODALITY_MARGIN = 0.15
#: the contrast check's tissue classes, as bands of percentiles of the template's brain
#: intensities: for a template whose cerebrospinal fluid (CSF) is dark (T1) the CSF is its
#: darkest tenth, the grey matter the 30th-45th percentiles and the white matter the brightest
#: 30 %; for one whose CSF is bright (T2, PD) the bands are mirrored. Modalities not named here
#: get no contrast check
CSF_IS_DARK = {"T1": True, "T2": False, "PD": False}
TISSUE_BANDS = {"csf": (0.0, 10.0), "grey": (30.0, 45.0), "white": (70.0, 100.0)}
#: the contrast check fails a scan whose grey-white contrast (grey minus white matter median, in
#: units of the brain's interquartile range) has the other sign than the template's and at least
#: this size, and warns when it is smaller than this in either direction
MIN_GREY_WHITE = 0.2
#: ... and warns when the scan's CSF contrast ((CSF - white) / (grey - white), medians) is under
#: this fraction of the template's: a T2 model given a PD scan, whose CSF is barely brighter than
#: grey matter (tissue physics: about 1-2 against 3-6 for a T2-weighted scan)
MIN_CSF_CONTRAST = 0.5
#: ... and, for a model whose CSF is bright (T2, PD), fails a scan whose deep CSF (the CSF band
#: deeper than :data:`DEEP_CSF_MM` in the template's brain: the ventricles and deep fissures,
#: which an affine registration lands on an individual's fluid better than the sulci) has its
#: darkest quarter under this, in units of (value - white) / (grey - white) medians: fluid
#: darker than white matter, a FLAIR (its fluid suppressed) given to a T2 model. Measured: the
#: ICBM T2 head +2.29, SPM's avg152T2 +1.35, avg152PD +1.06, the real pycortex head remapped
#: to T2 contrast +0.85; FLAIR-like heads (ICBM, and the pycortex head with its fluid at 0.15
#: or 0.45 of its T2 brightness) -2.26, -3.46 and -0.62
CSF_REVERSED = -0.25
DEEP_CSF_MM = 10.0
#: the contrast-agent check (T1 models): a voxel is "enhanced" when it lies more than this many
#: interquartile ranges of the brain's intensities above their 75th percentile (Tukey's far-out
#: fence; in a T1 brain without contrast agent nothing is that much brighter than white matter)
ENHANCED_FENCE_IQR = 3.0
#: ... and the scan looks contrast-enhanced when its enhanced voxels form at least this many
#: separate places (26-connected): enhancing vessels, dural sinuses and choroid plexus are
#: scattered over the whole brain, where a bright lesion is one or a few places. Measured on the
#: 2 mm template grid: two real contrast-enhanced clinical T1 heads (pyradiomics' test scans)
#: 161 and 171 places; the pycortex head (also with Rician noise at SNR 6, in 4-5 mm slices, with
#: bright lesions), SPM's T1 averages, the ANTs OASIS and SAMSEG templates none
MIN_ENHANCED_PLACES = 25
#: percentiles of the template's foreground z-scores that bound the healthy intensity range
#: (:meth:`Template.healthy_range`): 1 voxel in 1,000 of the template lies beyond each
HEALTHY_RANGE_PERCENTILES = (0.1, 99.9)
#: how far (mm) beyond the template's brain mask an extracted brain is still scored: the models
#: learned the brain as the template's mask draws it, and what a brain extraction adds beyond
#: it (on T2 the bright basal cisterns, the pituitary region, the sinus at the vertex) is
#: anatomy they never saw, a false positive on every healthy scan (:meth:`Template.known_brain`)
TEMPLATE_MARGIN_MM = 2.0
#: how far (mm) from where the scan's field of view cuts the brain (the extracted brain
#: reaching a face of the image or an end of the field of view inside it) the brain is not
#: scored: a brain cut short is anatomy the models never saw, and its cut edge lights up
#: (:func:`near_cut_edge`)
CUT_EDGE_MM = 10.0
#: the least area (mm²) of brain on a face of the image, or on an end of the field of view
#: inside it, that counts as a cut
CUT_EDGE_MIN_MM2 = 25.0
#: an unscored band (ml) this large makes the coverage check warn even where the template's
#: brain lies in view (a cut through the lower brainstem and cerebellum: 44 ml on a real
#: head; SPM's 2 mm averages, whose grid ends at the lowest brainstem, leave 2.7-2.8 ml)
CUT_BAND_WARN_ML = 5.0

StageCallback = Callable[[str], None]
CancelFlag = Callable[[], bool]


@dataclass(frozen=True)
class PrepareSettings:
    """Which preparation steps run.

    Attributes:
        mode: "auto" (each step when needed), "full" (every step), "none" (score as given).
        bias_correction, brain_extraction, registration: force a step on (True) or off (False);
            None follows ``mode`` (in "auto", brain extraction runs when a skull is detected).
        beyond_template: score the whole extracted brain: also beyond the template's brain
            (:data:`TEMPLATE_MARGIN_MM`) and near a cut of the field of view
            (:data:`CUT_EDGE_MM`); off for every front, on only where a calibration asks for
            it (``vaeloc calibrate --beyond-template``).
    """

    mode: str = "auto"
    bias_correction: bool | None = None
    brain_extraction: bool | None = None
    registration: bool | None = None
    beyond_template: bool = False

    def __post_init__(self) -> None:
        if self.mode not in PREPARE_MODES:
            raise InputError(
                f"unknown preparation mode {self.mode!r}; choose {', '.join(PREPARE_MODES)}"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def key(self) -> tuple:
        # beyond_template only when on: no front sets it, and the cohort's records of runs
        # keep their four switches
        switches = (self.mode, self.bias_correction, self.brain_extraction, self.registration)
        return (*switches, True) if self.beyond_template else switches


@dataclass
class FitCheck:
    """One input-fit check: ``level`` "ok", "warn" or "fail"; ``value`` its measure."""

    name: str
    level: str
    value: float | str
    message: str
    advice: str = ""


@dataclass
class Step:
    """One preparation step: whether it ran, why, and its time in seconds."""

    name: str
    ran: bool
    seconds: float = 0.0
    note: str = ""


@dataclass
class PreparationReport:
    """What preparation did and found; ``warnings`` are the checks that did not pass."""

    steps: list[Step] = field(default_factory=list)
    checks: list[FitCheck] = field(default_factory=list)
    template: str = ""
    modality_scores: dict[str, float] = field(default_factory=dict)
    #: what reading the scan noted (:attr:`napari_vaeloc.io.Volume.notes`, e.g. a header
    #: without orientation): a refusal shows them with the checks
    input_notes: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [c.message for c in self.checks if c.level != "ok"]

    @property
    def worst(self) -> str:
        """The worst level of the checks ("ok" < "warn" < "fail"; an unknown level counts as
        "warn"), "none" without checks."""
        order = {"ok": 0, "warn": 1, "fail": 2}
        return max((c.level for c in self.checks), key=lambda lv: order.get(lv, 1), default="none")

    def check(self, name: str) -> FitCheck | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> dict:
        return {
            "template": self.template,
            "steps": [vars(s) for s in self.steps],
            "checks": [vars(c) for c in self.checks],
            "modality_scores": dict(self.modality_scores),
            "input_notes": list(self.input_notes),
        }

    def lines(self) -> list[str]:
        """One line per step and check, for the command line and the widget."""
        out = [
            f"{s.name}: {'done' if s.ran else 'skipped'}"
            + (f" in {s.seconds:.1f} s" if s.ran else "")
            + (f" ({s.note})" if s.note else "")
            for s in self.steps
        ]
        return out + [f"check {c.name}: {c.level} ({c.message})" for c in self.checks]

    def refusal_lines(self) -> list[str]:
        """What a refusal shows before its reason: how the scan was read (``note: ...``, one
        per input note: the cause may lie there), then :meth:`lines`."""
        return [f"note: {n}" for n in self.input_notes] + self.lines()


@dataclass
class Template:
    """A model's template: the skull-stripped image and its brain mask, one grid."""

    image: Volume
    brain_mask: np.ndarray
    modality: str
    name: str

    @classmethod
    def of_model(cls, folder: Path, card: Any) -> Template:
        """The template a model folder ships (named in its card).

        Raises:
            InputError: the model names no template (it cannot be used with preparation).
        """
        pre = card.preprocessing
        if not pre.template or not pre.template_brain_mask:
            raise InputError(
                f"model {card.name!r} ships no template to register scans to; it can only "
                "score, without preparation, a scan already in its space"
            )
        image = load_volume(Path(folder) / pre.template)
        mask = load_volume(Path(folder) / pre.template_brain_mask, scorable=False).data > 0
        return cls(image, mask, card.modality, card.name)

    def holds(self, volume: Volume) -> bool:
        """True when ``volume`` lies on this template's grid: the same shape and an affine
        within 1e-3 (mm) of the template's."""
        return volume.shape == self.image.shape and np.allclose(
            volume.affine, self.image.affine, atol=1e-3
        )

    @functools.cached_property
    def _range_cache(self) -> dict:
        return {}

    @functools.cached_property
    def known_brain(self) -> np.ndarray:
        """bool, the template's grid: the voxels within :data:`TEMPLATE_MARGIN_MM` of its brain
        mask (Euclidean distance in mm), where a prepared scan's brain is scored."""
        from scipy import ndimage as ndi

        outside = ~self.brain_mask
        distance = ndi.distance_transform_edt(outside, sampling=self.image.spacing[:3])
        return distance <= TEMPLATE_MARGIN_MM

    def healthy_range(self, norm: Any) -> tuple[float, float]:
        """(low, high) z-units: the healthy intensity range of the model's inputs, the
        template's foreground z-scores (normalised as the engine normalises a scan with
        ``norm``, a :class:`~napari_vaeloc.models.card.Normalisation`) at the
        :data:`HEALTHY_RANGE_PERCENTILES`, never inside the clip range ``norm.clip``. The
        template is one of the anatomies the bundled models learned. Computed once per
        normalisation."""
        from .preprocess import normalisation_of

        key = (norm.foreground, tuple(norm.clip))
        if key not in self._range_cache:
            data, fg, _, stats = normalisation_of(self.image.data, norm)
            z = (data[fg] - stats["mean"]) / stats["std"]
            lo, hi = np.percentile(z, HEALTHY_RANGE_PERCENTILES)
            self._range_cache[key] = (min(float(lo), norm.clip[0]), max(float(hi), norm.clip[1]))
        return self._range_cache[key]


@dataclass
class Prepared:
    """A scan brought into a model's template space.

    Attributes:
        scan: the scan as given.
        volume: the (bias-corrected) brain on the template's grid, 0 outside the brain; where
            the template's brain lies beyond the scan's field of view, the template's
            intensities mapped onto the scan's (:attr:`beyond_view`).
        brain_mask: bool, the scan's grid: the extracted brain where the model knows brain
            (within :data:`TEMPLATE_MARGIN_MM` of the template's brain), farther than
            :data:`CUT_EDGE_MM` from where the field of view cuts it, and where the file held
            data (``scan.missing``), the voxels scored.
        template_mask: bool, the template's grid: where that brain landed.
        transform: template world (LPS) -> scan world (LPS), SimpleITK; None when the scan was
            scored on its own grid (no registration).
        report: steps and checks.
        corrected: float32, the scan's grid: the bias-corrected brain (0 outside it), for
            display.
        bias_field: the N4 bias field divided out (:class:`BiasField`; None: no bias-field
            correction ran).
        offset: subtracted from the corrected scan before it is resampled (its minimum), so
            the brain is non-negative.
        shift: added to the scan's intensities before every step (0 unless the scan holds
            negative values; see :func:`magnitudes`).
        cut_band: int64 flat indices (C order, the scan's grid) of the brain left unscored
            within :data:`CUT_EDGE_MM` of a cut of the field of view (empty without a cut).
        beyond_view: int64 flat indices (C order, the template's grid) of the template's brain
            beyond the scan's field of view, which :attr:`volume` holds filled from the
            template (:func:`template_input`; empty when the scan covers the whole brain).
        left_out: int64 flat indices (C order, the scan's grid) of the extracted brain's voxels
            beyond the known brain, near a cut of the field of view or without data in the
            file, not scored (:attr:`extracted_mask` has them back).
    """

    scan: Volume
    volume: Volume
    brain_mask: np.ndarray
    template_mask: np.ndarray
    transform: Any
    report: PreparationReport
    corrected: np.ndarray | None = None
    bias_field: BiasField | None = None
    offset: float = 0.0
    shift: float = 0.0
    left_out: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    cut_band: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    beyond_view: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    @property
    def extracted_mask(self) -> np.ndarray:
        """bool, the scan's grid: the brain as extracted, before what lies beyond the known
        brain was left out (a new array; e.g. where a benchmark seeds lesions and counts)."""
        out = self.brain_mask.copy()
        out.reshape(-1)[self.left_out] = True
        return out

    def to_scan(
        self,
        values: np.ndarray,
        kind: str = "map",
        index: tuple[slice, ...] | None = None,
        *,
        dtype: Any = None,
        cancel: CancelFlag | None = None,
    ) -> np.ndarray:
        """An array on the template's grid, resampled onto the scan's grid (linear for "map",
        nearest for "mask"); 0 outside the extracted brain. ``dtype`` for maps (default
        float32), bool for masks. ``index`` (one slice per axis, start:stop:step): only those
        voxels of the scan's grid, equal to ``to_scan(values, kind)[index]`` (e.g. the planes a
        preview shows, or every fifth voxel for an estimate), at the cost of those voxels
        alone. The whole grid is resampled in slabs of at most
        :data:`~napari_vaeloc.preprocess.CHUNK_VOXELS` voxels, written into the result one by
        one (no whole float32 copy of a float16 map) with ``cancel`` polled before each.

        Raises:
            Cancelled: ``cancel()`` returned True.
        """
        dtype = np.dtype(dtype or np.float32) if kind == "map" else np.dtype(bool)
        if index is not None or self.transform is None:
            return self._to_scan_part(values, kind, index).astype(dtype, copy=False)
        shape = tuple(self.scan.shape[:3])
        out = np.empty(shape, dtype)
        step = max(1, CHUNK_VOXELS // max(1, shape[0] * shape[1]))
        for z in range(0, shape[2], step):
            _raise_if(cancel)
            slab = (slice(None), slice(None), slice(z, min(z + step, shape[2])))
            out[slab] = self._to_scan_part(values, kind, slab)
        return out

    def _to_scan_part(
        self, values: np.ndarray, kind: str, index: tuple[slice, ...] | None
    ) -> np.ndarray:
        dtype = np.float32 if kind == "map" else bool
        if self.transform is None:
            out = np.array(np.asarray(values, dtype)[index or ...], dtype)
        else:
            out = resample(values, self.volume, self.scan, self.to_template, kind, index)
        inside = self.brain_mask if index is None else self.brain_mask[index]
        out[~inside] = 0
        return out

    def onto_template(self, values: np.ndarray, kind: str = "mask") -> np.ndarray:
        """An array on the scan's grid resampled onto the template's grid (linear for "map",
        nearest for "mask"; the inverse of :meth:`to_scan`), e.g. a ground-truth mask.
        float32 for maps, bool for masks; 0 outside the scan."""
        if self.transform is None:
            return np.asarray(values, np.float32 if kind == "map" else bool).copy()
        return resample(values, self.scan, self.volume, self.transform, kind)

    @functools.cached_property
    def to_template(self) -> Any:
        """The inverse transform, scan world -> template world (LPS), computed once."""
        return self.transform.GetInverse()


# -- SimpleITK <-> Volume ----------------------------------------------------------------------
_LPS = np.diag([-1.0, -1.0, 1.0])


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A (X, Y, Z) array with its RAS voxel-to-world affine as a SimpleITK image (LPS)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    a = np.asarray(affine, np.float64)
    spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    direction = _LPS @ (a[:3, :3] / spacing)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction.ravel()])
    img.SetOrigin([float(v) for v in _LPS @ a[:3, 3]])
    return img


def from_sitk(img: sitk.Image) -> np.ndarray:
    """The (X, Y, Z) array of a SimpleITK image."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def subgrid(
    shape: tuple[int, ...], affine: np.ndarray, index: tuple[slice, ...] | None
) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, voxel-to-world affine) of the voxels ``index`` (one start:stop:step slice per
    axis) of a grid: the whole grid when None."""
    affine = np.asarray(affine, np.float64)
    if index is None:
        return tuple(shape), affine
    starts, steps, counts = [], [], []
    for sl, n in zip(index, shape, strict=True):
        start, stop, step = sl.indices(n)
        starts.append(start)
        steps.append(step)
        counts.append(len(range(start, stop, step)))
    grid = np.eye(4)
    grid[:3, :3] = np.diag(steps)
    grid[:3, 3] = starts
    return tuple(counts), affine @ grid


def resample(
    values: np.ndarray,
    source: Volume,
    target: Volume,
    transform: Any,
    kind: str = "map",
    index: tuple[slice, ...] | None = None,
) -> np.ndarray:
    """``values`` on ``source``'s grid resampled onto ``target``'s grid (only its voxels
    ``index``, one slice per axis, when given); ``transform`` maps target world points (LPS)
    to source world points. Linear for maps (float32), nearest for masks (bool); 0 outside
    the source. uint8 and bool values are resampled as they are (a quarter of float32's
    memory), others as float32."""
    import SimpleITK as sitk

    shape, affine = subgrid(tuple(target.shape[:3]), target.affine, index)
    values = np.asarray(values)
    if values.dtype == bool:
        values = values.view(np.uint8)
    elif values.dtype not in (np.uint8, np.float32):
        values = values.astype(np.float32)
    src = to_sitk(values, source.affine)
    ref = to_sitk(np.zeros(shape, np.uint8), affine)
    if kind == "map":
        out = sitk.Resample(src, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return from_sitk(out)  # float32 already: no copy
    # a mask by nearest neighbour: uint8 throughout (a quarter of float32's memory)
    if values.dtype != np.uint8:
        src = sitk.Cast(src > 0.5, sitk.sitkUInt8)
    out = sitk.Resample(src, ref, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return from_sitk(out) > 0


# -- the steps ---------------------------------------------------------------------------------
def magnitudes(data: np.ndarray) -> tuple[np.ndarray, float]:
    """``data`` with its minimum moved to 0 when it is negative, and the shift added (else
    ``data`` itself and 0). MRI intensities are magnitudes, 0 where there is no signal; a scan
    stored with an offset (a signed type, a rescale intercept of -1024) has its background at
    the minimum. N4 divides the scan by a field, which is meaningful only for magnitudes: the
    bundled head stored with 1024 subtracted was corrected into a scan no template correlates
    with (r = 0.17) and refused."""
    low = float(np.min(data))
    if low >= 0.0:
        return data, 0.0
    return (np.asarray(data, np.float32) - np.float32(low)), -low


def neighbour_correlation(data: np.ndarray) -> float:
    """How alike neighbouring voxels are: the largest over the axes of the lag-one
    autocorrelation ``1 - mean(diff**2) / (2 var)`` (of every other line across the axis, for
    speed); 1 for a smooth image, near 0 for independent noise, at most 2. Axes of one voxel
    are skipped; a constant image gives 1."""
    x = np.asarray(data, dtype=np.float32)
    var = float(x.var())
    if var == 0.0:
        return 1.0
    best = -np.inf
    for ax in range(x.ndim):
        if x.shape[ax] < 2:
            continue
        lines = tuple(slice(None) if a == ax else slice(None, None, 2) for a in range(x.ndim))
        step = np.diff(x[lines], axis=ax)
        best = max(best, 1.0 - float(np.mean(step * step, dtype=np.float64)) / (2.0 * var))
    return float(best) if np.isfinite(best) else 1.0


def object_mask(data: np.ndarray) -> np.ndarray:
    """The head or brain: voxels above an Otsu threshold, holes filled, largest component."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    step = max(1, data.size // 2_000_000)
    thr = threshold_otsu(data.ravel()[::step])
    mask = data > thr
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == sizes.argmax()
    return fill_holes(mask)


def looks_skull_stripped(
    volume: Volume, view: FieldOfView | None = None, head: np.ndarray | None = None
) -> tuple[bool, float]:
    """(skull-stripped?, object volume in ml): a flat background (at least a fifth of the voxels
    at the minimum) around an object of brain size (:data:`MIN_BRAIN_ML` to
    :data:`MAX_BRAIN_ML`) that the field of view does not cut (a head cut by the field of view
    can be brain-sized and zero-filled around): the object crosses no face of the image and
    has no flat face with only background beyond (``view``, found when not given:
    :func:`~napari_vaeloc.fieldofview.find_field_of_view`). Where the background is not flat
    (a raw scan's noise) the object is what stands out of it, :func:`object_mask` (``head``,
    bool, the scan's shape, when already found): else every voxel would count."""
    data = volume.data
    obj = data > background_level(data)
    flat = 1.0 - float(np.mean(obj))
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    if flat < 0.2:
        obj = object_mask(data) if head is None else head
    ml = float(np.count_nonzero(fill_holes(obj))) * voxel_ml
    faces = [np.take(obj, i, axis=a) for a in range(3) for i in (0, -1) if obj.shape[a] > 1]
    cut = any(f.mean() > 0.02 for f in faces)  # object across a face of the field of view
    stripped = flat >= 0.2 and MIN_BRAIN_ML <= ml <= MAX_BRAIN_ML and not cut
    if stripped:  # unless cut short of the image's faces and filled out beyond
        view = find_field_of_view(data, volume.spacing) if view is None else view
        stripped = not view.planes
    return stripped, ml


def fill_brain(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every hole filled that is enclosed in 3D or in a 2D slice along any axis:
    a dark lesion core or a ventricle open to the surface on one side still belongs to the
    brain (the engine's foreground fills holes the same way, see
    :func:`napari_vaeloc.preprocess.fill_object`)."""
    from .preprocess import fill_object

    out = fill_object(mask)
    for axis in range(3):
        out |= fill_object(mask, axis)
    return out


def n4_correct(volume: Volume, mask: np.ndarray, cancel: CancelFlag | None = None) -> np.ndarray:
    """N4 bias-field corrected intensities (float32, the scan's shape), the field estimated on a
    copy shrunk to about 6 mm inside ``mask`` and divided out at full resolution."""
    return n4_field(volume, mask, cancel).correct(volume)


@dataclass(frozen=True)
class BiasField:
    """N4's multiplicative bias field of one scan, kept as its log on the shrunk grid it was
    estimated on (a few hundred kB); :meth:`correct` evaluates it at full resolution a slab
    of planes at a time, so no field of the scan's size is ever held.

    Attributes:
        log_field: SimpleITK image (LPS) of the log field on the shrunk grid.
    """

    log_field: Any

    def correct(self, volume: Volume, data: np.ndarray | None = None) -> np.ndarray:
        """``data`` (default: ``volume.data``; the grid of ``volume``) divided by the field:
        float32, a new array."""
        out = np.array(volume.data if data is None else data, dtype=np.float32, order="K")
        for planes, values in self._slabs(volume):
            out[:, :, planes] /= values
        return out

    def then(self, other: BiasField) -> BiasField:
        """The field of this correction followed by ``other`` (estimated on the once-corrected
        scan on the same shrunk grid): their product, kept as the sum of the logs."""
        import SimpleITK as sitk

        return BiasField(sitk.Add(self.log_field, other.log_field))

    def full(self, volume: Volume) -> np.ndarray:
        """The multiplicative field on ``volume``'s grid (float32): what :meth:`correct`
        divides by."""
        out = np.empty(volume.shape, np.float32)
        for planes, values in self._slabs(volume):
            out[:, :, planes] = values
        return out

    def _slabs(self, volume: Volume) -> Iterator[tuple[slice, np.ndarray]]:
        """(planes, field there) for slabs of about ``CHUNK_VOXELS`` voxels along the third
        axis: the log field interpolated linearly from the shrunk grid, then exponentiated."""
        import SimpleITK as sitk

        shape = tuple(volume.shape[:3])
        step = max(1, CHUNK_VOXELS // max(1, shape[0] * shape[1]))
        for z in range(0, shape[2], step):
            planes = slice(z, min(z + step, shape[2]))
            sub = subgrid(shape, volume.affine, (slice(None), slice(None), planes))
            ref = to_sitk(np.zeros(sub[0], np.uint8), sub[1])
            log = sitk.Resample(self.log_field, ref, sitk.Transform(), sitk.sitkLinear, 0.0)
            yield planes, np.exp(from_sitk(log))


#: the value N4 sees at the mask's robust maximum (:func:`n4_intensities`)
N4_SCALE = 1000.0


def n4_intensities(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values`` as N4 is given them: shifted so that the minimum is 1 (N4 takes logs) and
    scaled so that the 99.5th percentile inside ``mask`` (bool, ``values``' shape) is
    :data:`N4_SCALE` + 1. The scan's own units then do not matter: a scan and the same scan
    times 1000 get the same field, where a fixed shift of +1 on the raw values compressed the
    logs of a scan stored in [0, 1] and left about half of its field uncorrected.

    Returns:
        float32, ``values``' shape, all >= 1.
    """
    lo = float(values.min())
    inside = values[mask] if mask.any() else values.ravel()
    span = float(np.percentile(inside, 99.5)) - lo
    if not span > 0:
        span = float(values.max()) - lo or 1.0
    return ((values - lo) * (N4_SCALE / span) + 1.0).astype(np.float32)


def n4_field(volume: Volume, mask: np.ndarray, cancel: CancelFlag | None = None) -> BiasField:
    """The multiplicative N4 bias field of ``volume`` (the corrected scan is
    ``field.correct(volume)``), estimated on a copy shrunk to about 6 mm inside ``mask`` (bool,
    the scan's grid)."""
    import SimpleITK as sitk

    shrink = [max(1, round(6.0 / s)) for s in volume.spacing]
    # Shrink subsamples: shrinking first and then rescaling gives the same small image as
    # rescaling the whole scan
    small = sitk.Shrink(to_sitk(np.asarray(volume.data, np.float32), volume.affine), shrink)
    small_mask = sitk.Shrink(to_sitk(mask.view(np.uint8), volume.affine), shrink)
    values = sitk.GetArrayFromImage(small)
    small_img = sitk.GetImageFromArray(
        n4_intensities(values, sitk.GetArrayViewFromImage(small_mask).astype(bool))
    )
    small_img.CopyInformation(small)
    _raise_if(cancel)
    with single_threaded():  # about 2 s at 6 mm: cancel is checked before and after
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.SetMaximumNumberOfIterations([50, 40, 30])
        _execute(n4, small_img, small_mask)
        _raise_if(cancel)
        # the field is smooth: keep it on the shrunk grid, interpolate it where it is applied
        return BiasField(n4.GetLogBiasFieldAsImage(small_img))


class _CancellableModel:
    """A TorchScript network that checks ``cancel`` before each call (deepbet's two passes)."""

    def __init__(self, network: Any, cancel: CancelFlag | None) -> None:
        self.network, self.cancel = network, cancel

    def __call__(self, *args: Any) -> Any:
        _raise_if(self.cancel)
        return self.network(*args)

    def parameters(self) -> Any:
        return self.network.parameters()


#: the seed of the registration's metric sampling (not 0: SimpleITK reads 0 as "the clock")
REGISTRATION_SEED = 1
#: SimpleITK's thread count is process-wide: one preparation at a time sets it to 1
_SITK_THREADS_LOCK = threading.RLock()


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run SimpleITK on one thread inside the block, so that its results are repeatable.

    N4's B-spline fit and the registration's Mattes metric sum partial results of their
    threads in the order the threads finish; floating-point sums in another order differ in
    the last bits, and the registration's optimizer amplifies that into transforms that differ
    by up to a few hundredths of a millimetre between two runs, and into masks that differ at
    their edges. On one thread the order is fixed, so the same scan gives the same transform,
    bias field and mask in every run and process, whatever the machine's thread settings. The
    setting is process-wide (other SimpleITK calls running at the same time also get one
    thread); it is restored on leaving the block."""
    import SimpleITK as sitk

    with _SITK_THREADS_LOCK:
        before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


#: deepbet's networks, one shared instance per device, whose passes are wrapped per call
_BETS: dict[str, Any] = {}
_BET_LOCK = threading.Lock()


#: brain extraction works on voxels of at least about this size (mm): deepbet resizes the head's
#: bounding box to 256 voxels a side anyway, and a finer scan only costs memory (deepbet keeps
#: several float32 copies of its input)
BET_WORK_MM = 1.0


def extract_brain(
    volume: Volume, cancel: CancelFlag | None = None, device: str = "cpu",
    work_mm: float = BET_WORK_MM,
) -> np.ndarray:  # fmt: skip
    """deepbet's brain mask of ``volume`` (bool, its shape), with its default threshold 0.5,
    its networks on ``device`` (a torch device name; deepbet moves its input to them); cancel
    is checked before each of its two network passes. A scan with voxels finer than
    ``work_mm`` along an axis is averaged down by an integer factor there first (SimpleITK's
    ``BinShrink``) and the mask is brought back to its grid by nearest neighbour. Where
    deepbet's network finds nothing (a lesion mask, a one-voxel image), the mask is empty."""
    import nibabel as nib
    import torch

    factors = [max(1, int(work_mm / s + 1e-6)) for s in volume.spacing[:3]]
    work = volume
    if max(factors) > 1:
        import SimpleITK as sitk

        small = sitk.BinShrink(to_sitk(np.asarray(volume.data, np.float32), volume.affine), factors)
        work = Volume.from_array(from_sitk(small), _ras_affine(small))
    img = nib.Nifti1Image(np.asarray(work.data, np.float32), work.affine)
    with _BET_LOCK:  # the widget's modality guess and a run may both extract at once
        bet = _BETS.get(device)
        if bet is None:
            from deepbet.bet import BrainExtraction

            bet = BrainExtraction(no_gpu=True)  # loaded on the CPU, then moved
            if torch.device(device).type != "cpu":
                bet.model, bet.bbox_model = bet.model.to(device), bet.bbox_model.to(device)
            _BETS[device] = bet
        model, bbox_model = bet.model, bet.bbox_model
        bet.model = _CancellableModel(model, cancel)
        bet.bbox_model = _CancellableModel(bbox_model, cancel)
        try:
            with torch.no_grad():
                _, mask_img, _ = bet.run(img)
        except ValueError as exc:
            # deepbet keeps the largest part of what its network found, and fails on nothing
            if "empty sequence" not in str(exc):
                raise
            return np.zeros(volume.shape, bool)
        finally:
            bet.model, bet.bbox_model = model, bbox_model
    mask = np.asarray(mask_img.dataobj) > 0
    del img, mask_img
    if mask.shape != work.shape:  # deepbet keeps the grid; guard against a 4D quirk
        mask = mask.reshape(work.shape)
    if work is not volume:
        import SimpleITK as sitk

        mask = resample(mask, work, volume, sitk.Transform(), "mask")
    return mask


#: a scan is in thick slices when its largest voxel side is at least this many times its
#: smallest
THICK_SLICE_RATIO = 1.5


def thick_slices(volume: Volume) -> str | None:
    """The plane of a scan's slices when they are thick ("axial", "coronal" or "sagittal":
    the voxel axis of the largest side, :data:`THICK_SLICE_RATIO` or more times the smallest,
    runs mainly along the world's S-I, A-P or L-R axis), None for near-isotropic voxels. On
    the real pycortex head, 4-6 mm coronal slices brought false parts of 4.7-12.7 ml, axial
    ones none (docs/results.md)."""
    spacing = [float(v) for v in volume.spacing[:3]]
    if len(spacing) < 3 or max(spacing) < THICK_SLICE_RATIO * min(spacing):
        return None
    axis = int(np.argmax(spacing))
    world = int(np.argmax(np.abs(_axes(volume.affine)[:, axis])))
    return next(name for name, ras in AXES.items() if ras == world)


def slab_plane(volume: Volume) -> str | None:
    """The plane of a scan's slices (:func:`thick_slices`) when they are also thicker than the
    voxel-size check accepts without a warning (``VOXEL_MM["ok"]``, 3 mm), else None: the
    slices whose fused companion model the engine leaves out
    (:func:`napari_vaeloc.engine.localize`). On the real pycortex head that network raised
    false parts from 4 mm coronal slices on, and leaving it out at 3 mm lost lesion Dice
    (0.83 -> 0.76) for no false part to remove (docs/results.md)."""
    plane = thick_slices(volume)
    return plane if plane is not None and max(volume.spacing[:3]) > VOXEL_MM["ok"] else None


def _axes(affine: np.ndarray) -> np.ndarray:
    """The unit column vectors of a voxel-to-world affine's linear part (3x3)."""
    linear = np.asarray(affine, np.float64)[:3, :3]
    return linear / np.sqrt((linear**2).sum(axis=0))


def extract_brain_upright(
    volume: Volume, rotation: np.ndarray, template: Template,
    cancel: CancelFlag | None = None, device: str = "cpu",
) -> np.ndarray:  # fmt: skip
    """:func:`extract_brain` on ``volume`` resampled (linearly, voxels of ``BET_WORK_MM`` or the
    scan's finest side if coarser) onto a grid whose axes are the template's as ``rotation``
    (3x3 RAS, template axes -> scan world) places them in the head, so that the head reaches
    deepbet upright; the mask (bool, ``volume``'s shape) comes back by nearest neighbour."""
    import SimpleITK as sitk

    step = max(BET_WORK_MM, min(volume.spacing[:3]))
    axes = rotation @ _axes(template.image.affine)  # the upright grid's axes in world (RAS)
    # the head's extent along those axes: its object voxels (every 4th) in world, projected
    head = object_mask(volume.data)[::4, ::4, ::4]
    index = np.argwhere(head) * 4.0
    world = index @ np.asarray(volume.affine)[:3, :3].T + np.asarray(volume.affine)[:3, 3]
    along = world @ axes
    margin = 4.0 * max(volume.spacing[:3])
    lo, hi = along.min(axis=0) - margin, along.max(axis=0) + margin
    shape = tuple(int(np.ceil(n)) + 1 for n in (hi - lo) / step)
    upright_affine = np.eye(4)
    upright_affine[:3, :3] = axes * step
    upright_affine[:3, 3] = axes @ lo
    grid = Volume(np.zeros(shape, np.uint8), upright_affine)
    offset = float(volume.data.min())
    values = resample(np.asarray(volume.data, np.float32) - offset, volume, grid, sitk.Transform())
    # deepbet orders voxels by the affine's nearest axes: give it the template's, unrotated
    seen = np.eye(4)
    seen[:3, :3] = _axes(template.image.affine) * step
    mask = extract_brain(Volume(values + offset, seen), cancel, device)
    del values
    return resample(mask, grid, volume, sitk.Transform(), "mask")


def _ras_affine(img: Any) -> np.ndarray:
    """The RAS voxel-to-world affine of a SimpleITK image made by :func:`to_sitk` (its
    inverse): axes in the array order of :func:`from_sitk`."""
    direction = np.array(img.GetDirection(), np.float64).reshape(3, 3)
    out = np.eye(4)
    out[:3, :3] = _LPS @ direction * np.array(img.GetSpacing(), np.float64)[None, :]
    out[:3, 3] = _LPS @ np.array(img.GetOrigin(), np.float64)
    return out


def _registration_images(
    brain: Volume, template: Template, in_view: np.ndarray | None
) -> tuple[Any, Any, Any]:
    """(fixed, moving, moving mask or None): the template, the brain averaged down to about the
    template's voxel size (finer gains nothing), and ``in_view`` on the brain's grid."""
    import SimpleITK as sitk

    fixed = to_sitk(template.image.data.astype(np.float32), template.image.affine)
    moving = to_sitk(np.asarray(brain.data, np.float32), brain.affine)
    factors = [max(1, int(min(template.image.spacing) / s + 0.25)) for s in brain.spacing]
    if max(factors) > 1:
        moving = sitk.BinShrink(moving, factors)
    # where the field of view ends inside the image (``in_view``: 0 beyond), the template
    # beyond it has no scan to match: its samples are left out, not matched to the background
    # the reslice filled in (which would squeeze the template into the part in view)
    view = None if in_view is None else to_sitk(np.asarray(in_view, np.uint8), brain.affine)
    return fixed, moving, view


def _centred(fixed: Any, moving: Any, pitch_deg: float = 0.0) -> Any:
    """The similarity transform that maps the template's centre of mass onto the brain's,
    unscaled, rotated by ``pitch_deg`` degrees about the left-right axis."""
    import SimpleITK as sitk

    start = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Similarity3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )  # fmt: skip
    if pitch_deg:
        start.SetRotation((1.0, 0.0, 0.0), float(np.radians(pitch_deg)))
    return start


def register(
    brain: Volume,
    template: Template,
    cancel: CancelFlag | None = None,
    in_view: np.ndarray | None = None,
) -> tuple[Any, float]:
    """Affine transform (template world -> scan world, LPS) that aligns ``brain`` (skull-stripped,
    background 0) to ``template``, and the final Mattes mutual information (lower is better).

    Two stages on one multi-resolution scheme: a similarity transform (rotation, translation,
    isotropic scale) from the centres of mass, then the full affine from there; regular-step
    gradient descent with parameter scales from physical shifts. Where a start pitched about
    the left-right axis fits clearly better at the coarsest level (:func:`_pitch_start`), the
    similarity stage also runs from it, and the lower final metric wins. ``in_view`` (uint8 or
    bool on ``brain``'s grid, nonzero in the field of view) masks the metric on the scan's
    side: the template where the field of view ends inside the image is not matched."""
    import SimpleITK as sitk

    fixed, moving, view = _registration_images(brain, template, in_view)
    with single_threaded():
        pitch, _ = _pitch_start(fixed, moving, cancel, view)
        best = None
        for start in (0.0, pitch) if pitch else (0.0,):
            fit = _run_registration(
                fixed, moving, _centred(fixed, moving, start), [4, 2, 1], [2.0, 1.0, 0.0],
                cancel, view,
            )  # fmt: skip
            if best is None or fit[1] < best[1]:
                best = fit
        similarity = best[0]
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(similarity.GetMatrix())
        affine.SetTranslation(similarity.GetTranslation())
        affine.SetCenter(similarity.GetCenter())
        return _run_registration(fixed, moving, affine, [2, 1], [1.0, 0.0], cancel, view)


#: head pitches (degrees about the template's left-right axis) from which the registration also
#: tries to start: from no rotation alone, a real head pitched 45 degrees further than the
#: template (57 in all) stopped at 22 (brain-mask Dice 0.86, the template squeezed to 0.73)
PITCH_STARTS_DEG = (-50.0, -25.0, 25.0, 50.0)
#: a pitched start counts when its coarse fit's Mattes metric is this fraction lower (better)
#: than the unrotated start's (the real head upright: 6 % lower at -25 degrees, reaching the
#: same transform in the end; pitched 45 degrees further: 65 % lower at -50 degrees)
PITCH_GAIN = 0.15
#: and when its coarse fit ends at a rotation more than this (degrees) from the unrotated one's
SAME_START_DEG = 10.0


def head_rotation(
    brain: Volume,
    template: Template,
    cancel: CancelFlag | None = None,
    in_view: np.ndarray | None = None,
) -> np.ndarray:
    """Roughly how the head lies in the scan: the rotation (3x3, RAS, template axes -> scan
    world) at which the coarse similarity fit from :func:`register`'s better start ends.
    Arguments as :func:`register`'s."""
    fixed, moving, view = _registration_images(brain, template, in_view)
    with single_threaded():
        _, rotation = _pitch_start(fixed, moving, cancel, view)
    return _LPS @ rotation @ _LPS


def _pitch_start(
    fixed: Any, moving: Any, cancel: CancelFlag | None, view: Any
) -> tuple[float, np.ndarray]:
    """(pitch, rotation (LPS)): 0 unless a start pitched by one of :data:`PITCH_STARTS_DEG`
    ends the coarsest level (8 mm voxels, 2 mm smoothing) with a Mattes metric lower by
    :data:`PITCH_GAIN` at a rotation more than :data:`SAME_START_DEG` from where the unrotated
    start ends; the rotation at which the chosen start's coarse fit ends."""

    def coarse(pitch: float) -> tuple[float, np.ndarray]:
        start = _centred(fixed, moving, pitch)
        out, metric = _run_registration(fixed, moving, start, [4], [2.0], cancel, view)
        rotation = _rotation_part(np.array(out.GetMatrix(), np.float64).reshape(3, 3))
        return metric, rotation

    unrotated_metric, unrotated = coarse(0.0)
    best_metric, best = unrotated_metric, (0.0, unrotated)
    for pitch in PITCH_STARTS_DEG:
        metric, rotation = coarse(pitch)
        gain = (unrotated_metric - metric) / max(abs(unrotated_metric), 1e-6)
        if (
            metric < best_metric and gain > PITCH_GAIN
            and _angle_deg(rotation, unrotated) > SAME_START_DEG
        ):  # fmt: skip
            best_metric, best = metric, (pitch, rotation)
    return best


def _rotation_part(matrix: np.ndarray) -> np.ndarray:
    """The rotation of the polar decomposition ``matrix = rotation @ stretch`` of a 3x3 linear
    map (SVD): orthogonal, with determinant +1 for a map that keeps handedness."""
    u, _, vt = np.linalg.svd(matrix)
    return u @ vt


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """The angle (degrees) of the rotation that takes rotation matrix ``b`` to ``a``."""
    cos = (np.trace(a @ b.T) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _run_registration(
    fixed: Any,
    moving: Any,
    initial: Any,
    shrink: list[int],
    smoothing_mm: list[float],
    cancel: CancelFlag | None,
    moving_mask: Any = None,
) -> tuple[Any, float]:
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    # a fixed seed: SimpleITK's default, and a seed of 0 (sitkWallClock), take the clock
    reg.SetMetricSamplingPercentage(0.2, seed=REGISTRATION_SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=200, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )  # fmt: skip
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(smoothing_mm)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    _stop_on_cancel(reg, cancel)
    out = _execute(reg, fixed, moving)
    _raise_if(cancel)
    if isinstance(out, sitk.CompositeTransform) and out.GetNumberOfTransforms() == 1:
        out = out.GetNthTransform(0)
    out = out.Downcast() if hasattr(out, "Downcast") else out
    return out, float(reg.GetMetricValue())


def _stop_on_cancel(registration: Any, cancel: CancelFlag | None) -> None:
    """Stop the optimizer at the next iteration once ``cancel()`` is True (each remaining
    resolution level then stops at its first iteration)."""
    if cancel is None:
        return
    import SimpleITK as sitk

    def check() -> None:
        if cancel():
            registration.StopRegistration()

    registration.AddCommand(sitk.sitkIterationEvent, check)


def _execute(process: Any, *inputs: Any) -> Any:
    """``process.Execute(*inputs)`` with SimpleITK's errors as one clear line."""
    try:
        return process.Execute(*inputs)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "unknown"
        raise InputError(f"preparation failed: {reason}") from exc


def _raise_if(cancel: CancelFlag | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("preparation cancelled")


# -- checks ------------------------------------------------------------------------------------
def _shown(value: float, limits: Any, digits: int = 2, percent: bool = False) -> str:
    """``value`` written with ``digits`` decimals (a percentage when ``percent``), or with as
    many more (up to 4) as it takes not to read as equal to a limit it differs from: a Dice of
    0.8496 against the pass level 0.85 reads 0.8496, not 0.85 (a value and the limit it failed
    written alike read as a contradiction). ``limits``: the levels (a dict's values, pairs
    flattened)."""
    flat: list[float] = []
    for v in limits.values() if isinstance(limits, dict) else limits:
        flat.extend(v if isinstance(v, tuple | list) else [v])
    scale, unit = (100.0, "%") if percent else (1.0, "")
    for d in range(digits, digits + 5):
        text = f"{value * scale:.{d}f}"
        if not any(text == f"{lim * scale:.{d}f}" and lim != value for lim in flat):
            break
    return text + unit


def _level(value: float, levels: dict[str, float], higher_is_better: bool = True) -> str:
    if higher_is_better:
        return "ok" if value >= levels["ok"] else "fail" if value < levels["fail"] else "warn"
    return "ok" if value <= levels["ok"] else "fail" if value > levels["fail"] else "warn"


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def modality_scores(brain: np.ndarray, mask: np.ndarray, templates: list[Template]) -> dict:
    """modality -> correlation of ``brain`` (template grid) with each template inside ``mask``
    (the best template per modality)."""
    out: dict[str, float] = {}
    for t in templates:
        if t.image.shape != brain.shape:
            continue
        score = _ncc(brain[mask], t.image.data[mask])
        out[t.modality] = max(out.get(t.modality, -1.0), score)
    return out


def modality_check(scores: dict[str, float], template: Template) -> FitCheck:
    """The modality check of a scan whose correlation with each modality's template is
    ``scores``, for a model that learned ``template.modality``: "fail" when another modality
    correlates better by :data:`MODALITY_MARGIN` or more, "warn" when it correlates better by
    less."""
    want = template.modality
    own = scores.get(want)
    best = max(scores, key=scores.get) if scores else want
    advice = ""
    top = scores.get(best, 0.0)
    if top < MIN_MODALITY_R["ok"]:
        level = "fail" if top < MIN_MODALITY_R["fail"] else "warn"
        r = _shown(top, MIN_MODALITY_R)
        msg = (
            f"looks like none of the templates (best r = {r}, {best})"
            if level == "fail"
            else f"looks only weakly like {best} (r = {r}; a clear fit is "
            f"{MIN_MODALITY_R['ok']:.2f} or more)"
        )
        advice = (
            f"the scan {msg}: is it a brain MRI of a modality the models know "
            f"({', '.join(sorted(scores))})? A skull left on or a failed registration lowers "
            "the correlation too"
        )
        return FitCheck("modality", level, best, msg, advice)
    if own is None or best == want:
        level, msg = "ok", f"looks like {best}" + (f" (r = {own:.2f})" if own else "")
    elif scores[best] - own >= MODALITY_MARGIN:
        level, msg = "fail", f"looks like {best} (r = {scores[best]:.2f}), not {want}"
    else:
        level, msg = "warn", f"closer to {best} (r = {scores[best]:.2f}) than to {want}"
    if level != "ok":
        advice = (
            f"the scan {msg}: the model {template.name!r} learned {want} scans; "
            f"choose a {best} model"
        )
    return FitCheck("modality", level, best, msg, advice)


def tissue_contrast(values: np.ndarray, classes: dict[str, np.ndarray]) -> tuple[float, float]:
    """(grey-white contrast, CSF contrast) of ``values`` (1D, the brain's voxels) in the tissue
    ``classes`` (bool, as ``values``): the grey minus the white matter median in units of the
    interquartile range of all three classes, and (CSF - white) / (grey - white) of the
    medians (nan when grey and white have the same median). Both are blind to the scan's units
    and offset."""
    csf, grey, white = (float(np.median(values[classes[k]])) for k in ("csf", "grey", "white"))
    q1, q3 = np.percentile(values[classes["csf"] | classes["grey"] | classes["white"]], [25, 75])
    spread = float(q3 - q1)
    grey_white = (grey - white) / spread if spread > 0 else 0.0
    csf_ratio = (csf - white) / (grey - white) if grey != white else float("nan")
    return grey_white, csf_ratio


def contrast_check(brain: np.ndarray, mask: np.ndarray, template: Template) -> FitCheck | None:
    """Whether ``brain`` (the scan on the template's grid) has the tissue contrast of the scans
    ``template``'s model learned, inside ``mask`` (bool, the template's grid: where the scan's
    brain landed): its tissue classes are bands of the template's intensities
    (:data:`TISSUE_BANDS`), and :func:`tissue_contrast` is measured in both. "fail" when grey
    and white matter are ordered the other way round (a FLAIR, T2 or PD scan given to a T1
    model correlates with the T1 template through its dark CSF, but its grey matter is the
    brighter), "warn" when they barely differ (:data:`MIN_GREY_WHITE`) or when the CSF
    contrast is under :data:`MIN_CSF_CONTRAST` of the template's (a PD scan given to a T2
    model); "fail" too, for a model whose CSF is bright, when a quarter of the deep CSF is
    darker than white matter (:data:`CSF_REVERSED`: a FLAIR given to a T2 model). None when
    the template's modality is not in :data:`CSF_IS_DARK` or the scan's brain covers too little
    of a class to measure it."""
    dark = CSF_IS_DARK.get(template.modality.upper())
    if dark is None:
        return None
    inside = template.brain_mask
    own = np.asarray(template.image.data)[inside]
    classes = {}
    for name, (lo, hi) in TISSUE_BANDS.items():
        if not dark:
            lo, hi = 100.0 - hi, 100.0 - lo
        a, b = np.percentile(own, [lo, hi])
        classes[name] = (own >= a) & (own <= b)
    seen = mask[inside]
    scan_classes = {k: v & seen for k, v in classes.items()}
    if min(int(v.sum()) for v in scan_classes.values()) < FILL_MIN_VOXELS:
        return None
    gw, csf = tissue_contrast(np.asarray(brain)[inside], scan_classes)
    t_gw, t_csf = tissue_contrast(own, classes)
    want = template.modality
    order = "brighter" if t_gw > 0 else "darker"
    shown = f"grey-white contrast {gw:+.2f}, the {want} template's {t_gw:+.2f}"
    if gw * t_gw < 0 and abs(gw) >= MIN_GREY_WHITE:
        other = "darker" if t_gw > 0 else "brighter"
        msg = f"grey matter is {other} than white matter: {shown}"
        advice = (
            f"in the scan grey matter is {other} than white matter ({shown}); in the {want} "
            f"scans the model {template.name!r} learned it is {order}: is the scan of another "
            "contrast (FLAIR, T2 or PD for a T1 model; T1 for a T2 model)? Choose a model of "
            "the scan's contrast"
        )
        return FitCheck("contrast", "fail", round(gw, 3), msg, advice)
    if abs(gw) < MIN_GREY_WHITE:
        msg = f"grey and white matter barely differ: {shown}"
        return FitCheck("contrast", "warn", round(gw, 3), msg,
                        f"the scan's {msg}; the model learned {want} scans, where grey matter "
                        f"is clearly {order}: is the scan of another contrast?")  # fmt: skip
    fluid = None if dark else _deep_fluid(np.asarray(brain)[inside], scan_classes, template)
    if fluid is not None and fluid < CSF_REVERSED:
        t_fluid = _deep_fluid(own, classes, template)
        measured = (
            f"the darkest quarter of the deep CSF at {fluid:+.2f}, the {want} template's "
            f"{t_fluid:+.2f} (0: white, 1: grey matter)"
        )
        msg = f"fluid darker than white matter: {measured}"
        advice = (
            f"the scan's fluid is darker than its white matter ({measured}); in the {want} "
            f"scans the model {template.name!r} learned CSF is brighter than white matter: is "
            "the scan a FLAIR (fluid suppressed)? No bundled model learned FLAIR; a model of the "
            "scan's contrast is needed"
        )
        return FitCheck("contrast", "fail", round(fluid, 3), msg, advice)
    if np.isfinite(csf) and t_csf > 0 and csf < MIN_CSF_CONTRAST * t_csf:
        msg = f"CSF contrast {csf:.2f}, under half the {want} template's {t_csf:.2f}"
        advice = (
            f"the scan's {msg} ((CSF - white) / (grey - white) matter): is it of another "
            f"contrast than the {want} scans the model learned (PD, FLAIR)?"
        )
        return FitCheck("contrast", "warn", round(csf, 3), msg, advice)
    return FitCheck("contrast", "ok", round(gw, 3), f"{shown}; CSF contrast {csf:.2f}, the "
                    f"template's {t_csf:.2f}")  # fmt: skip


def _deep_fluid(
    values: np.ndarray, classes: dict[str, np.ndarray], template: Template
) -> float | None:
    """The 25th percentile of ``values`` (1D, the template brain's voxels) in the CSF class
    deeper than :data:`DEEP_CSF_MM` in the template's brain, as (value - white) / (grey -
    white) of the classes' medians; None when too few such voxels are seen or grey and white
    have one median."""
    from scipy import ndimage as ndi

    inside = template.brain_mask
    depth = ndi.distance_transform_edt(inside, sampling=template.image.spacing[:3])[inside]
    deep = classes["csf"] & (depth > DEEP_CSF_MM)
    if int(deep.sum()) < FILL_MIN_VOXELS:
        return None
    white, grey = (float(np.median(values[classes[k]])) for k in ("white", "grey"))
    if grey == white:
        return None
    return (float(np.percentile(values[deep], 25)) - white) / (grey - white)


#: the checks that depend on the template's modality, not on where the scan landed
#: (:func:`template_checks`): redone when a preparation is reused for another model's template
#: in the same space
TEMPLATE_CHECKS = ("modality", "contrast", "contrast agent")


def template_checks(
    scores: dict[str, float], brain: np.ndarray, mask: np.ndarray, template: Template
) -> list[FitCheck]:
    """The checks of :data:`TEMPLATE_CHECKS` for a scan prepared into ``template``'s space:
    the modality check from the correlation ``scores``, and, where they apply to the
    template's modality, the contrast check and the contrast-agent check of ``brain`` (the
    scan on the template's grid) inside ``mask`` (bool, that grid)."""
    checks = [modality_check(scores, template)]
    for check in (contrast_check, enhancement_check):
        found = check(brain, mask, template)
        if found is not None:
            checks.append(found)
    return checks


def enhancement_check(brain: np.ndarray, mask: np.ndarray, template: Template) -> FitCheck | None:
    """Whether ``brain`` (the scan on the template's grid) looks like a T1 scan after a
    gadolinium contrast agent, inside ``mask`` (bool, the template's grid: where the scan's
    brain landed): "warn" when its voxels brighter than the far-out fence
    (:data:`ENHANCED_FENCE_IQR`) form :data:`MIN_ENHANCED_PLACES` or more separate places. A
    model that learned T1 scans without contrast agent marks the enhancing vessels, dural
    sinuses and choroid plexus as anomalies. None for a template whose CSF is not dark (T2, PD:
    the agent barely shows) or a mask too small to measure."""
    from scipy import ndimage as ndi

    if not CSF_IS_DARK.get(template.modality.upper(), False) or mask.sum() < FILL_MIN_VOXELS:
        return None
    data = np.asarray(brain)
    q1, q3 = np.percentile(data[mask], [25, 75])
    bright = mask & (data > q3 + ENHANCED_FENCE_IQR * (q3 - q1))
    _, places = ndi.label(bright, structure=np.ones((3,) * bright.ndim, bool))
    voxel_ml = float(np.prod(template.image.spacing)) / 1000.0
    found = (
        f"{places} separate places ({bright.sum() * voxel_ml:.1f} ml) far brighter than white "
        "matter"
    )
    if places < MIN_ENHANCED_PLACES:
        return FitCheck("contrast agent", "ok", places, f"none seen: {found}")
    msg = f"the scan looks contrast-enhanced: {found}"
    advice = (
        f"{msg}, as enhancing vessels, dural sinuses and choroid plexus are after a gadolinium "
        f"contrast agent; the model {template.name!r} learned {template.modality} scans without "
        "one and marks them as anomalies: read parts along vessels and sinuses as such, or "
        "localize the scan taken before the contrast agent"
    )
    return FitCheck("contrast agent", "warn", places, msg, advice)


def template_key(template: Template) -> tuple:
    """Identifies a template's space (grid and brain mask, not its contrast): models whose
    templates share it share one preparation of a scan."""
    h = hashlib.sha256(np.packbits(template.brain_mask).tobytes())
    h.update(np.asarray(template.image.affine, np.float64).tobytes())
    return (template.image.shape, h.hexdigest())


def model_template(folder: str | Path | None, card: Any) -> Template | None:
    """The template a model folder ships (None when its card names none), read once per
    process while the file is unchanged: the engine, the modality check and the widget share
    it."""
    if folder is None or not card.preprocessing.template:
        return None
    folder = Path(folder).resolve()
    tfile = folder / card.preprocessing.template
    stamp = tfile.stat().st_mtime_ns if tfile.exists() else 0
    return _read_template(str(folder), card.name, stamp)


@functools.lru_cache(maxsize=16)
def _read_template(folder: str, name: str, stamp: int) -> Template:
    from .models.store import read_card

    return Template.of_model(Path(folder), read_card(folder))


def bundled_templates() -> list[Template]:
    """The templates of every bundled model that ships one (for the modality check)."""
    from .models.store import bundled_models, read_card

    found = (model_template(folder, read_card(folder)) for folder in bundled_models().values())
    return [t for t in found if t is not None]


# -- the stage ---------------------------------------------------------------------------------
def prepare(
    volume: Volume,
    template: Template,
    settings: PrepareSettings | None = None,
    *,
    stage: StageCallback | None = None,
    cancel: CancelFlag | None = None,
    templates: list[Template] | None = None,
    refuse: bool = True,
    device: str = "cpu",
) -> Prepared:
    """Bring ``volume`` into ``template``'s space and check that it fits (see the module doc).

    Args:
        template: the model's template (:meth:`Template.of_model`).
        settings: which steps run (default: "auto").
        stage: called with each stage's name as it starts (:data:`STAGES`).
        cancel: polled inside every stage; True raises :class:`Cancelled`.
        templates: templates of every modality for the modality check (default: the bundled
            models').
        refuse: raise on a clear misfit (False: only record it in the report).
        device: where brain extraction runs ("cpu", "cuda", "cuda:N", "mps"): deepbet's
            networks run on the scoring device; bias correction and registration are
            SimpleITK's, on the CPU.

    Raises:
        InputError: a clear misfit (wrong modality, failed registration, too little coverage,
            voxels too coarse); the message says what to do.
        Cancelled: ``cancel`` returned True.
    """
    s = settings or PrepareSettings()
    full = s.mode == "full"
    report = PreparationReport(template=template.name, input_notes=list(volume.notes))
    scan = volume
    clipped, outliers = clip_outliers(volume.data)
    if outliers.any():  # saturated or dropped-out voxels would skew every step below
        volume = Volume(clipped, volume.affine, volume.header, volume.path, volume.source_dtype)
        note = outlier_note(int(outliers.sum()))
        report.steps.append(Step("intensity outliers", True, 0.0, note))
    shifted, shift = magnitudes(volume.data)
    if shift:  # intensities below 0: the background is at the minimum, not at 0
        volume = Volume(shifted, volume.affine, volume.header, volume.path, volume.source_dtype)
        note = f"the scan holds negative intensities: {shift:.4g} added, its minimum taken as 0"
        report.steps.append(Step("intensity offset", True, 0.0, note))
    del shifted

    def begin(name: str) -> float:
        _raise_if(cancel)
        if stage is not None:
            stage(name)
        return time.perf_counter()

    t0 = begin(STAGES[0])
    worst, work_mm = max(volume.spacing), min(template.image.spacing)
    level = _level(worst, VOXEL_MM, higher_is_better=False)
    plane = thick_slices(volume)
    said = f"largest voxel side {worst:.2g} mm" + (f": {plane} slices" if plane else "")
    if level != "ok":
        said += f" (the model works at {work_mm:.2g} mm"
        if plane in ("coronal", "sagittal"):
            said += f"; thick {plane} slices can bring false parts, read them with care"
        said += ")"
    report.checks.append(FitCheck("voxel size", level, round(worst, 3), said))
    if level == "fail":
        raise InputError(
            f"the scan's voxels are {worst:.2g} mm along one side, too coarse to localize "
            f"anomalies (at most {VOXEL_MM['fail']:g} mm); use a higher-resolution scan"
        )
    structure = neighbour_correlation(volume.data)
    if structure < MIN_NEIGHBOUR_R:
        raise InputError(
            f"the scan has no spatial structure (neighbouring voxels correlate r = "
            f"{_shown(structure, [MIN_NEIGHBOUR_R])} at most, under {MIN_NEIGHBOUR_R:g}): it "
            "looks like noise, not a brain MRI; check that the file holds the image (data "
            "type, byte order)"
        )
    view = find_field_of_view(volume.data, volume.spacing)  # the image, or less where cut
    run_n4 = s.bias_correction if s.bias_correction is not None else True
    head = object_mask(volume.data) if run_n4 else None  # N4 is fitted inside it
    stripped, object_ml = looks_skull_stripped(volume, view, head)
    run_bet = s.brain_extraction if s.brain_extraction is not None else (full or not stripped)
    if stripped:
        skull_words = f"skull-stripped brain: an object of {object_ml:.0f} ml"
    elif object_ml < MIN_BRAIN_ML:  # neither a head nor a brain: say so, then extract
        skull_words = (
            f"an object of {object_ml:.0f} ml, smaller than an adult brain "
            f"({MIN_BRAIN_ML:.0f} ml): taken for a partial head with skull"
        )
    else:
        skull_words = f"head with skull: an object of {object_ml:.0f} ml"
    report.checks.append(FitCheck("skull", "ok", "absent" if stripped else "present", skull_words))
    report.steps.append(Step("checks", True, time.perf_counter() - t0))

    data = volume.data
    field = None
    if head is not None:
        t0 = begin(STAGES[1])
        field = n4_field(volume, head, cancel)  # fitted inside the head
        del head
        data = field.correct(volume)
        n4_step = Step(STAGES[1], True, time.perf_counter() - t0)
        report.steps.append(n4_step)
    else:
        report.steps.append(Step(STAGES[1], False, note="turned off"))
    corrected = Volume(data, volume.affine, volume.header, volume.path, volume.source_dtype)

    if run_bet:
        t0 = begin(STAGES[2])
        brain_mask = extract_brain(corrected, cancel, device)
        extraction = Step(STAGES[2], True, time.perf_counter() - t0)
    else:
        brain_mask = data > background_level(data)
        why = "turned off" if s.brain_extraction is False else "already skull-stripped"
        extraction = Step(STAGES[2], False, note=why)
    report.steps.append(extraction)
    if not brain_mask.any():
        raise InputError("no brain found in the scan; is it a brain MRI?")
    brain_mask = fill_brain(brain_mask)
    # no brain beyond the field of view where a cut was filled out to the grid (an
    # extraction's mask can reach a voxel past the last plane of data)
    in_view = view.inside(volume.shape)
    if in_view is not None:
        brain_mask &= in_view.view(bool)
    upright_note = ""
    too_large = _ml(brain_mask, volume) > BRAIN_ML["ok"][1]
    if run_bet and too_large and s.registration is not False:
        # a brain larger than an adult's: deepbet may have seen the head far from upright (it
        # orders the voxels by the nearest axes only) and taken in the face and neck; the brain
        # found is enough to tell how the head lies: extract again with the head turned
        # upright, and keep that brain if its volume is an adult brain's
        first = Volume(brain_values(data, brain_mask, float(data.min())), volume.affine)
        rotation = head_rotation(
            first, template, cancel, _cut_view(brain_mask, in_view, view, volume)
        )
        del first
        first_ml = _ml(brain_mask, volume)
        again = fill_brain(extract_brain_upright(corrected, rotation, template, cancel, device))
        if in_view is not None:
            again &= in_view.view(bool)
        if _plausible_ml(again, volume):
            brain_mask = again
            upright_note = (
                "; extracted again with the head turned upright (as the head lies in the scan, "
                f"{first_ml:.0f} ml were found)"
            )
        else:
            upright_note = (
                "; extracted again with the head turned upright, which found "
                f"{_ml(again, volume):.0f} ml, no adult brain either: the first extraction is kept"
            )
        del again
        extraction.seconds = time.perf_counter() - t0
    if field is not None and run_bet and N4_BRAIN_PASS:
        # a second pass inside the brain: the first, fitted to the whole head, is pulled by
        # the scalp's fat and the skull, and leaves part of the field in the brain
        t0 = time.perf_counter()
        field = field.then(n4_field(corrected, brain_mask, cancel))
        data = field.correct(volume)
        n4_step.seconds += time.perf_counter() - t0
        n4_step.note = "refitted inside the extracted brain"
    brain_ml = _ml(brain_mask, volume)
    if run_bet:  # the brain as the checks count it, holes filled
        extraction.note = f"brain {brain_ml:.0f} ml{upright_note}"
    (lo, hi), (flo, fhi) = BRAIN_ML["ok"], BRAIN_ML["fail"]
    b_level = "ok" if lo <= brain_ml <= hi else "fail" if not flo <= brain_ml <= fhi else "warn"
    report.checks.append(
        FitCheck("brain volume", b_level, round(brain_ml, 1),
                 f"{brain_ml:.0f} ml of brain (an adult brain is {lo:.0f}-{hi:.0f} ml)",
                 "" if b_level == "ok" else
                 f"the brain found is {brain_ml:.0f} ml, not a whole adult brain "
                 f"({lo:.0f}-{hi:.0f} ml): is this a brain MRI covering the whole brain? If "
                 "the skull was misjudged, force brain extraction on or off")
    )  # fmt: skip
    offset = float(data.min())
    brain_data = brain_values(data, brain_mask, offset)
    brain = Volume(brain_data, volume.affine, volume.header, volume.path)

    same_grid = template.holds(brain)
    run_reg = s.registration if s.registration is not None else (full or not same_grid)
    grid_note = "already on the template's grid"
    if same_grid and not run_reg and s.registration is None:
        # the header says template grid; trust it only if the anatomy is where the template's is
        aligned = mask_dice(brain_mask, template.brain_mask)
        if aligned < REGISTRATION_DICE["ok"]:
            run_reg = True
            grid_note = (
                f"on the template's grid but not aligned with it (brain-mask Dice {aligned:.2f})"
            )
    if run_reg:
        t0 = begin(STAGES[3])
        # a brain cut where the view ends inside the image: the template beyond is not matched
        transform, metric = register(
            brain, template, cancel, _cut_view(brain_mask, in_view, view, volume)
        )
        moved = resample(brain.data, brain, template.image, transform, "map")
        carried = resample(brain_mask, brain, template.image, transform, "mask")
        seen = np.ones(volume.shape, np.uint8) if in_view is None else in_view
        inside = resample(seen, brain, template.image, transform)
        del seen
        why = f"Mattes MI {metric:.3f}" + (f"; {grid_note}" if same_grid else "")
        report.steps.append(Step(STAGES[3], True, time.perf_counter() - t0, why))
    else:
        if not same_grid:
            raise InputError(
                "registration is off but the scan is not on the model's template grid; "
                "turn registration on"
            )
        transform = None
        moved, carried = brain.data, brain_mask
        inside = np.ones(volume.shape, np.uint8) if in_view is None else in_view
        report.steps.append(Step(STAGES[3], False, note=grid_note))

    tmask = template.brain_mask
    coverage = float((inside[tmask] > 0.5).mean()) if tmask.any() else 1.0
    level = _level(coverage, COVERAGE)
    report.checks.append(
        FitCheck("coverage", level, round(coverage, 4),
                 f"{_shown(coverage, COVERAGE, 0, True)} of the template's brain lies in "
                 "the scan's field of view")
    )  # fmt: skip
    dice = mask_dice(carried, tmask)
    reg_level = _level(dice, REGISTRATION_DICE)
    if coverage < COVERAGE["ok"]:  # a partial scan cannot cover the whole template brain
        reg_level = "warn" if reg_level == "fail" and dice >= 0.3 else reg_level
    partial = coverage < COVERAGE["ok"] and reg_level != "ok"
    report.checks.append(
        FitCheck("registration", reg_level, round(dice, 4),
                 f"brain-mask Dice with the template {_shown(dice, REGISTRATION_DICE)} (pass >= "
                 f"{REGISTRATION_DICE['ok']:g})"
                 + ("; lowered by the partial coverage: the template's brain beyond the field "
                    "of view has no brain to match" if partial else ""))
    )  # fmt: skip
    if transform is not None:
        scaling = scaling_check(transform)
        report.checks.append(scaling)
        cover = report.check("coverage")
        if scaling.level != "ok" and cover is not None and cover.level == "ok":
            # a slab the template was squeezed into holds all of the squeezed template
            cover.level = "warn"
            cover.message += (
                " as registered, but the registration had to squeeze or stretch the template "
                "(template scaling): the scan may cover only part of the brain"
            )
    scores = modality_scores(moved, tmask & carried, templates or bundled_templates())
    report.modality_scores = scores
    report.checks.extend(template_checks(scores, moved, tmask & carried, template))
    if orientation_unknown(scan):
        report.checks.append(orientation_check(report))

    advice = {
        "coverage": f"only {_shown(coverage, COVERAGE, 0, True)} of the brain lies in the "
        "scan's field of view; localize a scan that covers the whole brain",
        "registration": f"registration to the {template.name} template failed (brain-mask "
        f"Dice {_shown(dice, REGISTRATION_DICE)}); check that the scan is a brain MRI, or "
        "force brain extraction on or off if the skull was misjudged",
    }
    for c in report.checks:
        if c.level != "ok" and c.name in advice:
            c.advice = advice[c.name]
    if refuse:
        refuse_misfit(report)
    del brain, brain_data
    if not s.beyond_template:
        carried = carried & template.known_brain  # a new array: unregistered, it is brain_mask
    # the template's brain beyond the field of view, filled from the template for the model
    beyond = np.flatnonzero((template.brain_mask & (inside <= 0.5)).ravel(order="C"))
    del inside
    prepared = Volume(template_input(moved, template, carried, beyond), template.image.affine,
                      template.image.header, volume.path)  # fmt: skip
    fitted = Prepared(scan, prepared, brain_mask, carried, transform, report, beyond_view=beyond)
    known, left_out = brain_mask, np.empty(0, np.int64)
    cut_band = np.empty(0, np.int64)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    notes = [extraction.note]
    if not s.beyond_template:  # the extracted brain, where the model knows brain
        box = bounding_box(brain_mask)  # resampled there only: a brain is a fraction of a scan
        known = np.zeros_like(brain_mask)
        known[box] = fitted.to_scan(template.known_brain, "mask", box)  # within brain_mask
        left_ml = (int(brain_mask.sum()) - int(known.sum())) * voxel_ml
        if left_ml >= 0.05:
            notes.append(f"{left_ml:.1f} ml more than {TEMPLATE_MARGIN_MM:g} mm beyond the "
                         "template's brain, not scored")  # fmt: skip
        # where the field of view cuts the brain the model knows (tissue beyond the
        # template's brain reaching a face of the image is no cut)
        cut = near_cut_edge(known, volume.spacing, in_view=in_view)
        if cut is not None:
            known &= ~cut
            cut_band = np.flatnonzero(cut.ravel(order="C"))
            band_ml = int(cut.sum()) * voxel_ml
            notes.append(f"{band_ml:.1f} ml within {CUT_EDGE_MM:g} mm of where the field of "
                         "view cuts the brain, not scored")  # fmt: skip
            cover = report.check("coverage")
            if cover is not None and cover.level != "ok":  # said only where a band is left out
                cover.message += f"; the brain within {CUT_EDGE_MM:g} mm of the cut is not scored"
            elif cover is not None and band_ml >= CUT_BAND_WARN_ML:
                # the template's brain is (nearly) all in view, but this brain is cut
                cover.level = "warn"
                cover.message += (f", but {band_ml:.1f} ml of the brain within "
                                  f"{CUT_EDGE_MM:g} mm of where the field of view cuts it is "
                                  "not scored")  # fmt: skip
                cover.advice = (f"a lesion within {CUT_EDGE_MM:g} mm of where the field of view "
                                "cuts the brain cannot be found; localize a scan that covers "
                                "the whole brain")  # fmt: skip
    if scan.missing is not None and (known & scan.missing).any():
        # voxels the file held no number for (scored filled from around them): no map, no
        # brain mask, no corrected brain there (the engine's note gives their volume)
        known = known & ~scan.missing
    if known is not brain_mask:
        left_out = np.flatnonzero((brain_mask & ~known).ravel(order="C"))
    extraction.note = "; ".join(n for n in notes if n)
    corrected = data if data is not volume.data else data.astype(np.float32)  # never the scan
    np.copyto(corrected, 0, where=~known)
    return dataclasses.replace(
        fitted, brain_mask=known, corrected=corrected, bias_field=field, offset=offset,
        shift=shift,
        left_out=left_out, cut_band=cut_band,
    )  # fmt: skip


def _plausible_ml(brain_mask: np.ndarray, volume: Volume) -> bool:
    """Whether a brain mask on ``volume``'s grid holds an adult brain's volume
    (:data:`BRAIN_ML`'s ok range)."""
    lo, hi = BRAIN_ML["ok"]
    return lo <= _ml(brain_mask, volume) <= hi


def _ml(mask: np.ndarray, volume: Volume) -> float:
    """The volume (ml) of a mask on ``volume``'s grid."""
    return float(np.count_nonzero(mask)) * float(np.prod(volume.spacing)) / 1000.0


#: how far (mm) inside an end of the field of view the registration stops matching: a reslice
#: that interpolated the cut leaves the brain fading out over a few voxels, and matched there the
#: template was squeezed (to 0.53 on a real head cut at a 20 degree tilt with a 3-voxel ramp;
#: with the margin 0.87, the whole head 0.89)
VIEW_MARGIN_MM = 5.0


def _cut_view(
    brain_mask: np.ndarray, in_view: np.ndarray | None, view: FieldOfView, volume: Volume
) -> np.ndarray | None:
    """Where the registration matches the scan (uint8, 1 within the field of view and at least
    :data:`VIEW_MARGIN_MM` inside its ends) when the brain reaches an end of the field of view
    inside the image (the template beyond it is then left unmatched), else None."""
    if in_view is not None and view_end_contact(brain_mask, in_view, volume.spacing):
        return view.inside(volume.shape, VIEW_MARGIN_MM)
    return None


def near_cut_edge(
    mask: np.ndarray,
    spacing: tuple[float, ...],
    mm: float = CUT_EDGE_MM,
    in_view: np.ndarray | None = None,
) -> np.ndarray | None:
    """The voxels of ``mask`` within ``mm`` of where it reaches the end of the field of view
    (a face of the image, or the edge of ``in_view``: the field of view cuts it there), or None
    where it reaches none with :data:`CUT_EDGE_MIN_MM2` or more. Distances are Euclidean in mm
    from the mask's voxels on that end, within ``mm`` of it.

    Args:
        mask: bool (X, Y, Z), e.g. the extracted brain on the scan's grid.
        spacing: (3,) voxel sides in mm.
        in_view: uint8 or bool (X, Y, Z), nonzero in the field of view where it ends inside the
            image (:meth:`~napari_vaeloc.fieldofview.FieldOfView.inside`); None: the image.
    """
    from scipy import ndimage

    out: np.ndarray | None = None
    for ax, size in enumerate(mask.shape):
        if size < 2:
            continue
        face_mm2 = float(np.prod([spacing[a] for a in range(3) if a != ax]))
        depth = min(size, int(np.ceil(mm / spacing[ax])) + 1)
        for end in (0, size - 1):
            face = np.take(mask, end, axis=ax)
            if np.count_nonzero(face) * face_mm2 < CUT_EDGE_MIN_MM2:
                continue
            rows = np.arange(depth) if end == 0 else np.arange(size - depth, size)
            slab = np.take(mask, rows, axis=ax)
            seed = np.zeros(slab.shape, bool)
            edge = 0 if end == 0 else depth - 1
            index = [slice(None)] * 3
            index[ax] = edge
            seed[tuple(index)] = face
            dist = ndimage.distance_transform_edt(~seed, sampling=spacing)
            near = slab & (dist <= mm)
            if out is None:
                out = np.zeros(mask.shape, bool)
            index[ax] = slice(int(rows[0]), int(rows[-1]) + 1)
            out[tuple(index)] |= near
    reach = None if in_view is None else view_end_contact(mask, in_view, spacing)
    if reach is not None:
        box, contact = reach
        dist = ndimage.distance_transform_edt(~contact, sampling=spacing)
        if out is None:
            out = np.zeros(mask.shape, bool)
        out[box] |= mask[box] & (dist <= mm)
    return out


def view_end_contact(
    mask: np.ndarray, in_view: np.ndarray, spacing: tuple[float, ...]
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Where ``mask`` reaches an end of the field of view inside the image: (the mask's box
    grown by a voxel, bool on that box: the mask's voxels next to a voxel out of view), or None
    where they cover less than :data:`CUT_EDGE_MIN_MM2`.

    Args:
        mask: bool (X, Y, Z), e.g. the extracted brain.
        in_view: uint8 or bool (X, Y, Z), nonzero in the field of view
            (:meth:`~napari_vaeloc.fieldofview.FieldOfView.inside`).
        spacing: (3,) voxel sides in mm.
    """
    from scipy import ndimage

    if not mask.any():
        return None
    box = bounding_box(mask, margin=1)
    beyond = ~np.asarray(in_view[box], bool)
    contact = mask[box] & ndimage.binary_dilation(beyond, np.ones((3, 3, 3), bool))
    voxel_mm2 = float(np.prod(spacing[:3])) ** (2.0 / 3.0)
    if np.count_nonzero(contact) * voxel_mm2 < CUT_EDGE_MIN_MM2:
        return None
    return box, contact


#: the fewest voxels of brain that the scan and the template share for the template's
#: intensities to be mapped onto the scan's (:func:`template_input`)
FILL_MIN_VOXELS = 1000


def template_input(
    moved: np.ndarray,
    template: Template,
    carried: np.ndarray,
    beyond: np.ndarray | None = None,
) -> np.ndarray:
    """The brain resampled onto the template's grid (``moved``) as the model scores it: float32,
    0 outside the template's brain and the carried brain (``carried``: within
    :attr:`Template.known_brain` unless the settings score beyond it).

    Where the template's brain lies beyond the scan's field of view (``beyond``: int64 flat
    indices, C order, on the template's grid) the template's own intensities are filled in,
    mapped onto the scan's by quantile matching (the percentiles 0-100 of both where they share
    brain), so that the model sees a whole brain: left as a void, the edge of a brain cut short
    lit up beyond the unscored band (a real 1 mm head cut at a 20 degree tilt, healthy: 8.3 ml
    marked; filled: none; results.md). Nothing is filled when they share fewer than
    :data:`FILL_MIN_VOXELS` voxels.
    """
    out = np.where(template.brain_mask | carried, moved, 0).astype(np.float32)
    if beyond is None or beyond.size == 0:
        return out
    shared = template.brain_mask & carried
    shared.reshape(-1)[beyond] = False
    if np.count_nonzero(shared) < FILL_MIN_VOXELS:
        return out
    levels = np.linspace(0.0, 100.0, 101)
    own = np.percentile(template.image.data[shared], levels)
    scan = np.percentile(moved[shared], levels)
    values = np.asarray(template.image.data).reshape(-1)[beyond]
    out.reshape(-1)[beyond] = np.interp(values, own, scan)
    return out


def brain_values(data: np.ndarray, brain_mask: np.ndarray, offset: float) -> np.ndarray:
    """float32 ``data - offset`` inside ``brain_mask``, 0 outside: the brain that is registered
    and scored (one new array, no temporaries of the scan's size)."""
    out = np.zeros_like(data, dtype=np.float32)  # the scan's memory order: no copy for SimpleITK
    np.subtract(data, np.float32(offset), out=out, where=brain_mask, casting="unsafe")
    return out


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks of one grid (0 when both are empty)."""
    return float(2 * (a & b).sum() / max(1, int(a.sum()) + int(b.sum())))


def transform_scales(transform: Any) -> np.ndarray:
    """(3,) how much an affine ``transform`` (SimpleITK, template world -> scan world) scales
    along its principal directions: the singular values of its 3x3 matrix, largest first."""
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    return np.linalg.svd(matrix, compute_uv=False)


def scaling_check(transform: Any) -> FitCheck:
    """The template scaling check (limits :data:`SCALING` and :data:`ANISOTROPY`): whether
    the registration fitted the template to the brain as a whole adult brain needs, or had to
    squeeze or stretch it, as it does to fit a slab or a partial scan."""
    scales = transform_scales(transform)
    lo, hi = float(scales.min()), float(scales.max())
    ratio = hi / lo if lo > 0 else math.inf

    def level(name: str) -> bool:
        (a, b), most = SCALING[name], ANISOTROPY[name]
        return a <= lo and hi <= b and ratio <= most

    lvl = "ok" if level("ok") else "warn" if level("fail") else "fail"
    (a, b), most = SCALING["ok"], ANISOTROPY["ok"]
    lo_s, hi_s = _shown(lo, SCALING), _shown(hi, SCALING)
    message = (
        f"the template was scaled by {lo_s}-{hi_s} along its axes to fit the brain (a whole "
        f"adult brain: {a:g}-{b:g}, at most {most:g} times more along one axis than another)"
    )
    advice = (
        f"the registration had to squeeze or stretch the template (by {lo_s}-{hi_s} along "
        "its axes) to fit this scan: it likely covers only part of the brain (a slab) or is "
        "not an adult brain; localize a scan that covers the whole brain"
    )
    if lvl != "ok":
        message += "; the scan may cover only part of the brain, so coverage may read too high"
    return FitCheck("template scaling", lvl, f"{lo:.3f}-{hi:.3f}", message,
                    advice if lvl == "fail" else "")  # fmt: skip


#: the checks that tell whether a scan lies as the template does once registered (and the
#: modality scores: a scan like no template's modality)
FIT_CHECKS = ("registration", "template scaling")


def orientation_check(report: PreparationReport) -> FitCheck:
    """The check of a scan whose header gives no orientation (no usable sform or qform; its
    voxels taken as R, A, S): "fail" when any of :data:`FIT_CHECKS` in ``report`` did not
    pass or the scan correlates well with no template (a head stored in another voxel order
    lies turned or mirrored, and a registration cannot mirror it: on the real head stored L,
    I, A it still reached modality r 0.29 and gave a 30 ml mask of Dice 0.38), else "warn"
    (left and right cannot be told apart)."""
    misfit = [c.name for c in report.checks if c.name in FIT_CHECKS and c.level != "ok"]
    if max(report.modality_scores.values(), default=0.0) < MIN_MODALITY_R["ok"]:
        misfit.append("modality")  # like no template at all (another one's modality is no misfit)
    message = (
        "the header gives no orientation (no sform or qform): its voxels were taken as R, A, S"
    )
    if not misfit:
        return FitCheck("orientation", "warn", "unknown",
                        message + "; left and right cannot be told apart")  # fmt: skip
    return FitCheck(
        "orientation", "fail", "unknown",
        message + f", and as read the scan fits the template badly ({', '.join(misfit)}): "
        "the head may lie turned or mirrored",
        "the header gives no orientation and, with its voxels taken as R, A, S, the scan fits "
        f"the template badly ({', '.join(misfit)}): give the file its orientation (an sform or "
        "qform, e.g. from the scanner's conversion) and try again",
    )  # fmt: skip


def refuse_misfit(report: PreparationReport) -> None:
    """Raise :class:`~napari_vaeloc.errors.MisfitError` (an InputError carrying ``report``) with
    the advice of the most telling check that failed, if any: the orientation (a header
    without one explains every misfit), the template scaling (a slab squeezed into the
    template is misread by every later check), then the modality, the tissue contrast and the
    brain volume before coverage and registration, whose failure they explain."""
    order = {"orientation": -2, "template scaling": -1, "modality": 0, "contrast": 0.5,
             "brain volume": 1}  # fmt: skip
    failed = sorted((c for c in report.checks if c.level == "fail"),
                    key=lambda c: order.get(c.name, 2))  # fmt: skip
    if failed:
        raise MisfitError(failed[0].advice or failed[0].message, report)


# -- cache -------------------------------------------------------------------------------------
_CACHE: OrderedDict[tuple, Prepared] = OrderedDict()
CACHE_SIZE = 4
#: preparations under way (cache key -> set when it ends), so that a second caller of the same
#: preparation (a run started while the panel's modality guess prepares the scan) waits for it
#: instead of repeating it side by side; guarded with the cache by ``_CACHE_LOCK``
_IN_FLIGHT: dict[tuple, threading.Event] = {}
_CACHE_LOCK = threading.Lock()


def scan_key(volume: Volume) -> str:
    """sha256 of a scan's voxels and affine: the cache key of its preparation."""
    h = hashlib.sha256()
    data = np.asarray(volume.data)
    # the voxels in C order, a slab at a time: no copy of the whole scan (a 600x600x400 scan's
    # copy and its bytes held Python's GIL for about half a second); hashlib releases it
    step = max(1, CHUNK_VOXELS // max(1, data[:1].size))
    for i in range(0, data.shape[0], step):
        h.update(np.ascontiguousarray(data[i : i + step]).data)
    h.update(np.asarray(volume.affine, np.float64).tobytes())
    return h.hexdigest()


def _cache_key(volume: Volume, settings: PrepareSettings, template: Template) -> tuple:
    """The cache key of a preparation: the scan's content, the settings, the template space."""
    return (scan_key(volume), settings.key(), template_key(template))


def _remember(key: tuple, prepared: Prepared) -> Prepared:
    """Put ``prepared`` in the cache as its newest entry, dropping the oldest beyond
    :data:`CACHE_SIZE`; returns it."""
    _CACHE[key] = prepared
    _CACHE.move_to_end(key)
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return prepared


def prepare_cached(
    volume: Volume,
    template: Template,
    settings: PrepareSettings | None = None,
    **kwargs: Any,
) -> Prepared:
    """:func:`prepare`, reusing the result for the same scan content, settings and template
    space (the last :data:`CACHE_SIZE` of them), so rerunning, or switching between models
    whose templates share a space (the bundled T1 and T2 models do), does not repeat it; the
    modality check is then redone for the model asked for. A call for a preparation another
    thread is making waits for it (polling ``cancel``) and reuses it."""
    s = settings or PrepareSettings()
    refuse = kwargs.pop("refuse", True)
    key = _cache_key(volume, s, template)
    hit, waited = None, False
    while True:
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
                break
            pending = _IN_FLIGHT.get(key)
            if pending is None:  # this call prepares it
                pending = _IN_FLIGHT[key] = threading.Event()
                break
        # another thread prepares the same scan: wait for it, then look again (if it failed
        # or was cancelled, this call prepares the scan itself)
        if not waited and kwargs.get("stage") is not None:
            kwargs["stage"](STAGES[0])
        waited = True
        while not pending.wait(0.05):
            _raise_if(kwargs.get("cancel"))
    if hit is None:
        try:
            fresh = prepare(volume, template, s, refuse=False, **kwargs)
            with _CACHE_LOCK:
                _remember(key, fresh)
        finally:
            with _CACHE_LOCK:
                _IN_FLIGHT.pop(key, None)
            pending.set()
        out = fresh
    else:
        report = hit.report
        if report.template != template.name:  # another model's template in the same space
            redone = template_checks(report.modality_scores, hit.volume.data,
                                     template.brain_mask & hit.template_mask, template)  # fmt: skip
            at = next(i for i, c in enumerate(report.checks) if c.name in TEMPLATE_CHECKS)
            kept = [c for c in report.checks if c.name not in TEMPLATE_CHECKS]
            checks = kept[:at] + redone + kept[at:]
            report = dataclasses.replace(report, checks=checks, template=template.name)
        out = dataclasses.replace(hit, scan=volume, report=report)
    if refuse:
        refuse_misfit(out.report)
    return out


def apply_prepared(
    fitted: Prepared, volume: Volume, template: Template, settings: PrepareSettings | None = None
) -> Prepared:
    """The preparation ``fitted`` to one scan, applied without refitting to ``volume``, another
    scan on the same grid (e.g. a copy with an inserted lesion): the same bias field, brain
    mask, intensity offset and transform, and the same report. The result is also put in the
    cache of :func:`prepare_cached` (under ``volume``, ``settings`` and ``template``), so that
    ``engine.localize(volume, model, prepare=settings)`` scores it without fitting again.

    Raises:
        InputError: ``volume`` is not on the fitted scan's grid.
    """
    scan = fitted.scan
    if volume.shape != scan.shape or not np.allclose(volume.affine, scan.affine, atol=1e-4):
        raise InputError(
            "a fitted preparation applies only to scans on the grid it was fitted to "
            f"({'x'.join(map(str, scan.shape))}); this scan's grid differs"
        )
    data = clip_outliers(volume.data)[0]
    if fitted.shift:
        data = np.asarray(data, np.float32) + np.float32(fitted.shift)
    if fitted.bias_field is not None:
        data = fitted.bias_field.correct(volume, data)
    else:
        data = data.astype(np.float32)
    # registered as fitted: the brain as extracted, then restricted on the template's grid
    brain_data = brain_values(data, fitted.extracted_mask, fitted.offset)
    if fitted.transform is None:
        moved = brain_data
    else:
        brain = Volume(brain_data, volume.affine, volume.header, volume.path)
        moved = resample(brain_data, brain, fitted.volume, fitted.transform, "map")
    moved = template_input(moved, template, fitted.template_mask, fitted.beyond_view)
    image = Volume(moved, fitted.volume.affine, fitted.volume.header, volume.path)
    del brain_data
    np.copyto(data, 0, where=~fitted.brain_mask)
    out = dataclasses.replace(fitted, scan=volume, volume=image, corrected=data)
    key = _cache_key(volume, settings or PrepareSettings(), template)
    with _CACHE_LOCK:
        return _remember(key, out)


def prepared_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """Every file :func:`save_prepared` writes."""
    return {
        "prepared": out_dir / f"{stem}_prepared.nii.gz",
        "brain_mask": out_dir / f"{stem}_brain_mask.nii.gz",
        "corrected": out_dir / f"{stem}_corrected.nii.gz",
        "transform": out_dir / f"{stem}_to_template.tfm",
        "report": out_dir / f"{stem}_prepare.json",
    }


def save_prepared(
    prepared: Prepared, out_dir: str | Path, stem: str, overwrite: bool = False
) -> dict[str, Path]:
    """Write a preparation so a user can look at it: the brain on the template's grid
    (``_prepared``), the brain mask and the bias-corrected brain on the scan's grid
    (``_brain_mask``, ``_corrected``, with the scan's affine and header), the transform
    (``_to_template.tfm``, ITK text format: template world -> scan world in LPS mm, the
    convention of ITK resampling) and the report (``_prepare.json``). Every target is checked
    before anything is written, and the five files appear together or not at all.

    Raises:
        OutputExistsError: some targets exist and ``overwrite`` is false (nothing written).
    """
    import SimpleITK as sitk

    from .io import WriteSet, refuse_existing

    paths = prepared_paths(Path(out_dir), stem)
    refuse_existing(paths.values(), overwrite, "output file")
    corrected = prepared.corrected
    if corrected is None:
        corrected = np.where(prepared.brain_mask, prepared.scan.data, 0).astype(np.float32)
    transform = prepared.transform if prepared.transform is not None else sitk.Transform()
    with WriteSet(overwrite) as ws:  # the five files appear together or not at all
        ws.add_nifti(prepared.volume.data, prepared.volume, paths["prepared"], "map")
        ws.add_nifti(prepared.brain_mask, prepared.scan, paths["brain_mask"], "mask")
        ws.add_nifti(corrected, prepared.scan, paths["corrected"], "map")
        ws.add(paths["transform"], lambda tmp: sitk.WriteTransform(transform, str(tmp)))
        ws.add_json(prepared.report.to_dict(), paths["report"])
    return paths
