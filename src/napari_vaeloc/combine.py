"""The post-processing pipeline: cached component maps in, combined map and mask out (numpy only).

Every front (the widget, the command line, the demo, the evaluation runner, the scripts) goes
through one :class:`PostProcessor`, so that the same scan and settings give the same combined
map and mask everywhere. Its steps, in order:

1. **component scales**: a component map is divided by its *scale*, the model's calibrated
   healthy-foreground value (``Calibration.scales[name]``, the 99th percentile on healthy
   validation slices). An uncalibrated model falls back to the scan's own foreground 99th
   percentile; results then say ``calibrated: false`` and a threshold means "above this scan's
   own 99th percentile", not a false-positive rate.
2. **weights**: the weighted sum ``sum_k w_k * map_k / scale_k`` (components with weight 0 are
   skipped).
3. **3D smoothing**: a Gaussian of sigma ``smoothing_mm`` (mm, per-axis voxels). For a prepared
   scan, whose maps are 0 outside the extracted brain, it is normalised to the foreground
   (values outside never leak in); otherwise the model's outputs around the object take part,
   as they did when the thresholds were calibrated. Smoothing is linear, so each scaled
   component is smoothed once and cached: moving a weight then costs a weighted sum.
4. **per-scan normalisation** (``scan_normalise``): robust z-units of the scan itself,
   ``max(0, (c - median) / (1.4826 MAD))`` over the foreground, so that a scan whose healthy
   tissue is explained worse overall (another scanner, unusual anatomy) does not light up
   everywhere at a fixed threshold. Then zero outside the foreground (``foreground_only``).
5. **threshold**, **outline** and **minimum component size** give the mask. Without a grow
   level: the voxels above the threshold. With one below the threshold (hysteresis
   thresholding): the threshold decides *where* there is a lesion and the outline *how far*
   it reaches. Each connected part (26 neighbours) of the map above the grow level whose peak
   passes the threshold is kept, and within it the voxels at or above
   ``max(grow level, outline_fraction * peak)``. An 8 mm smoothed map stays above a strict
   threshold only in a lesion's core; the smoothed edge of a lesion crosses half its height
   at the edge itself, so an ``outline_fraction`` near 0.5 (the half maximum) outlines a lesion
   where it is, for weak and strong lesions alike. With ``outline_smoothing_mm`` the outline
   is drawn on a sharper map instead: the same combination smoothed with that sigma (steps
   1-4), within each kept part the voxels at or above ``outline_fraction`` of the part's peak
   *on the sharper map*. The smoothed map still decides where a part is and how far it may
   reach; the sharper one where its edge lies, which a wide Gaussian moves outwards.
   Unsmoothed (``outline_smoothing_mm`` 0, the bundled T1 model's choice on its held-out
   individuals) the sharper map is read only at the voxels of the parts above the grow level:
   no float volume is made for it, only one uint8 volume of every part's cut. A sharper
   map's outline can leave a few loose voxels beside a part's edge
   (3-5 voxels on thick-slice grids); pieces of it smaller than :data:`MIN_OUTLINE_PIECE_MM3`
   are dropped. Parts whose region above the grow level is smaller than the minimum size
   (mm^3) are removed.

The threshold <-> healthy false-positive rate conversion reads the model's calibrated table
(``Calibration.combined_fpr``), valid for the combination it was calibrated for, or at another
smoothing that smoothing's levels (``Calibration.smoothing_fpr``; :func:`fpr_pairs`), which
:func:`at_smoothing` carries a threshold across.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .hostmem import host_array
from .mapnames import COMBINABLE_MAPS, PRESETS, check_names

if TYPE_CHECKING:  # the engine pulls in torch lazily; only its result type is needed here
    from .engine import LocalizationResult
    from .models.card import Calibration, ModelCard

#: voxels a whole-volume step handles at once where it would otherwise make a full-size
#: temporary or hold the interpreter for long (8 Mi: 32 MiB of float32)
CHUNK_VOXELS = 1 << 23
#: fallback when a model has no calibration: the scan's own foreground percentile
FALLBACK_PERCENTILE = 99.0
DEFAULT_WEIGHTS = {"combi": 1.0}
#: a calibrated default (``vaeloc calibrate``) outlines its mask's parts down to the threshold
#: of this healthy false-positive rate (step 5) ...
GROW_FPR = 0.01
#: ... at this fraction of each part's peak: chosen on the held-out individuals of both bundled
#: models among 0.25-0.6 (docs/results.md; the half maximum, 0.5, came close)
OUTLINE_FRACTION = 0.4
#: the smoothing (sigma, mm) that small lesions need: a bright 0.5 ml sphere in a real 1 mm head
#: is missed at the bundled models' 6 mm and outlined at 3 mm, each at its own 0.1 % level
#: (Dice 0.83; docs/results.md)
SMALL_LESION_SMOOTHING_MM = 3.0
#: pieces (26 neighbours) of a part's outline on a sharper map smaller than this (mm^3) are
#: dropped: on the real T1 head resliced to 3 and 4 mm slabs, and on two clinical heads of
#: 6.5 mm slices, the unsmoothed map left pieces of 9-20 mm^3 beside a lesion's outline, which
#: the mask line counted as parts. Four voxels of the models' 2 mm grid: finer than anything
#: the 6 mm smoothed map that finds a part resolves (docs/results.md)
MIN_OUTLINE_PIECE_MM3 = 32.0


@dataclass(frozen=True)
class CombineSettings:
    """Weights per component, extra 3D smoothing (sigma, mm), per-scan robust normalisation,
    threshold (scale units, or robust z-units with ``scan_normalise``), grow level (the
    threshold's units; None: no growth), outline fraction (of a part's peak, in [0, 1)), the
    smoothing of the map parts are outlined on (sigma, mm; None: the combined map itself) and
    minimum lesion size (mm^3); step 5 of the module doc. Validated when made: change one
    with :meth:`replace`.

    Raises:
        InputError: a weight names an unknown map (the message lists the valid names), or a
            value is not finite, or a smoothing or the minimum size is negative.
    """

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    smoothing_mm: float = 0.0
    threshold: float = 1.0
    min_size_mm3: float = 0.0
    foreground_only: bool = True
    scan_normalise: bool = False
    grow_threshold: float | None = None
    outline_fraction: float = 0.0
    outline_smoothing_mm: float | None = None

    def __post_init__(self) -> None:
        check_names(self.weights, COMBINABLE_MAPS, "weights")
        weights = {str(k): float(v) for k, v in self.weights.items()}
        if not all(math.isfinite(w) for w in weights.values()):
            raise InputError(f"weights must be finite numbers, got {weights}")
        object.__setattr__(self, "weights", weights)
        for name in ("smoothing_mm", "threshold", "min_size_mm3"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, not {value}")
            object.__setattr__(self, name, value)
        if self.smoothing_mm < 0 or self.min_size_mm3 < 0 or self.threshold < 0:
            raise InputError("threshold, smoothing and minimum size must be >= 0")
        if self.grow_threshold is not None:
            grow = float(self.grow_threshold)
            if not math.isfinite(grow) or grow < 0:
                raise InputError(f"grow_threshold must be a finite number >= 0, not {grow}")
            object.__setattr__(self, "grow_threshold", grow)
        fraction = float(self.outline_fraction)
        if not 0.0 <= fraction < 1.0:
            raise InputError(f"outline_fraction must be in [0, 1), not {fraction}")
        object.__setattr__(self, "outline_fraction", fraction)
        if self.outline_smoothing_mm is not None:
            sharp = float(self.outline_smoothing_mm)
            if not math.isfinite(sharp) or sharp < 0:
                raise InputError(f"outline_smoothing_mm must be a sigma >= 0 in mm, not {sharp}")
            object.__setattr__(self, "outline_smoothing_mm", sharp)

    @classmethod
    def from_card(cls, card: ModelCard) -> CombineSettings:
        """The model's default combination (its card's defaults; the class defaults for fields
        the card leaves out)."""
        d = card.defaults
        given = {
            f.name: getattr(d, f.name)
            for f in dataclasses.fields(cls)
            if getattr(d, f.name, None) is not None
        }
        return cls(**given)

    @classmethod
    def preset(cls, name: str, card: ModelCard) -> CombineSettings:
        """A named combination (:data:`PRESETS`): "default", the model card's; "paper", the
        method of Zimmerer et al. (MICCAI 2019) as published: the Combi map alone, no 3D
        smoothing, no per-scan normalisation, no minimum size, thresholded at 1 (the model's
        healthy 99th percentile of Combi: a 1 % healthy false-positive rate per pixel).

        Raises:
            InputError: an unknown name (the message lists the presets).
        """
        if name == "default":
            return cls.from_card(card)
        if name == "paper":
            return cls._paper()
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")

    def replace(self, **changes) -> CombineSettings:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def used_weights(self) -> dict[str, float]:
        """The non-zero weights."""
        return {k: w for k, w in self.weights.items() if w}

    @classmethod
    def _paper(cls) -> CombineSettings:
        return cls(weights={"combi": 1.0}, threshold=1.0)

    def is_paper(self) -> bool:
        """Whether these are the "paper" preset's settings (:meth:`preset`)."""
        return self == self._paper()

    def grow_level(self) -> float | None:
        """The level the mask's parts grow down to, or None when there is no growth (no grow
        level, or one at or above the threshold)."""
        g = self.grow_threshold
        return g if g is not None and g < self.threshold else None

    def without_outline(self) -> CombineSettings:
        """A copy whose mask is the voxels above the threshold (no grow level)."""
        return self.replace(grow_threshold=None, outline_fraction=0.0, outline_smoothing_mm=None)

    def outline_dropped(self) -> bool:
        """Whether an outline is set but does not act: the threshold is at or below its grow
        level, so the mask is the voxels above the threshold (:meth:`grow_level`)."""
        return self.grow_threshold is not None and self.grow_level() is None

    def sharp_outline(self) -> float | None:
        """The sigma (mm) of the map the mask's parts are outlined on when it is not the
        combined map's own (step 5 of the module doc), else None."""
        sharp = self.outline_smoothing_mm
        if self.grow_level() is None or sharp is None or sharp == self.smoothing_mm:
            return None
        return sharp

    def mask_key(self) -> tuple:
        """What the mask depends on besides the combined map."""
        grow = self.grow_level()
        fraction = self.outline_fraction if grow is not None else 0.0
        return (self.threshold, grow, fraction, self.min_size_mm3, self.sharp_outline())


@dataclass
class Combination:
    """The combined map and mask of one volume under some settings, with the scales used."""

    combined: np.ndarray  # float32, the maps' shape
    mask: np.ndarray  # uint8, the maps' shape
    scales: dict[str, float]
    calibrated: bool


@dataclass
class SlicePreview:
    """One slice of a combination (:meth:`PostProcessor.slice_preview`): the combined map's
    and the mask's slice, whether both are exact, and whether the combined map changed."""

    combined: np.ndarray
    mask: np.ndarray
    exact: bool
    combined_changed: bool


class PostProcessor:
    """One result's post-processing under changing settings; nothing here runs the network.

    ``combined()`` and ``mask()`` cache their last output (keyed on the settings that matter to
    them), each smoothed, scaled component, and the connected components of the last
    thresholded map, so a threshold move only re-thresholds, a weight move only re-sums and a
    minimum-size move only looks up component sizes. Both take the settings to use (default:
    ``settings``), so that a worker thread can compute one combination while the GUI thread
    changes ``settings``; the caches are shared between threads (a lock guards them, the work
    itself runs outside it). :meth:`slice_preview` gives one slice of the same combination
    from the cached components, for showing it before the whole volume is done.

    Args:
        result: the engine's output (maps on the scan's grid, foreground, the volume, the card).
        settings: the starting settings (default: the card's).
        calibration: overrides the card's calibration (None: the card's).
    """

    def __init__(
        self,
        result: LocalizationResult,
        settings: CombineSettings | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        self.result = result
        self.card = result.card
        self.calibration = calibration if calibration is not None else result.card.calibration
        self.spacing = result.volume.spacing
        self.settings = settings if settings is not None else self.default_settings()
        self._lock = threading.RLock()
        self._scales: dict[str, tuple[float, bool]] = {}
        self._smooth_cache: dict[tuple[str, float, bool], np.ndarray] = {}
        self._combined_key: tuple | None = None
        self._combined: np.ndarray | None = None
        self._mask_key: tuple | None = None
        self._mask_of: np.ndarray | None = None  # the combined map the cached mask is of
        self._mask: np.ndarray | None = None
        self._mask_voxels = 0  # of the cached mask, counted where it was made
        self._cut_note: tuple[np.ndarray, str | None] | None = None  # (mask, its cut note)
        self._parts: tuple[np.ndarray, float, np.ndarray, np.ndarray] | None = None
        self._peak_cache: tuple[np.ndarray, np.ndarray] | None = None
        # the sharper map parts are outlined on: (key, map); every part's outline on it, loose
        # pieces dropped: (labels, key, outline); the unsmoothed map's median and spread:
        # (key, stats)
        self._sharp: tuple[tuple, np.ndarray] | None = None
        self._sharp_outline: tuple[np.ndarray, tuple, np.ndarray] | None = None
        self._raw_stats: tuple[tuple, tuple[float, float] | None] | None = None
        self._sample: np.ndarray | None = None  # foreground voxels for preview statistics
        self._norm_cache: tuple[float, np.ndarray] | None = None

    def default_settings(self) -> CombineSettings:
        return CombineSettings.from_card(self.card)

    # -- scales ----------------------------------------------------------------------------
    def scale(self, name: str) -> tuple[float, bool]:
        """(scale, calibrated) of one component map: the model's calibrated scale, or the
        scan's own foreground 99th percentile."""
        if name not in self._scales:
            calib = self.calibration.scales if self.calibration is not None else {}
            if calib.get(name, 0) > 0:
                self._scales[name] = (float(calib[name]), True)
            else:
                # a deferred map is made for its percentile and let go (no layer may need it)
                values = self.result.maps.peek(name)
                self._scales[name] = (_fallback_scale(values, self.fg()), False)
        return self._scales[name]

    def fg(self) -> np.ndarray:
        return self.result.foreground

    def rates_approximate(self) -> bool:
        """Whether the result was scored with fewer slicing axes than its card's threshold and
        healthy rates were measured with (a note ending in
        :data:`napari_vaeloc.engine.APPROXIMATE_NOTE` says so): a front stating a calibrated
        rate adds :data:`napari_vaeloc.engine.APPROXIMATE_RATES`."""
        from .engine import APPROXIMATE_NOTE

        return any(note.endswith(APPROXIMATE_NOTE) for note in self.result.notes)

    def is_calibrated(self) -> bool:
        used = self._used()
        return bool(used) and all(self.scale(k)[1] for k in used)

    def _used(self, settings: CombineSettings | None = None) -> dict[str, float]:
        s = self.settings if settings is None else settings
        return {k: w for k, w in s.used_weights().items() if k in self.result.maps}

    # -- the pipeline ----------------------------------------------------------------------
    @staticmethod
    def combined_key(settings: CombineSettings) -> tuple:
        """What the combined map depends on (weights, smoothing, normalisation, foreground)."""
        s = settings
        return (tuple(sorted(s.weights.items())), s.smoothing_mm, s.foreground_only,
                s.scan_normalise)  # fmt: skip

    def _inside(self, s: CombineSettings) -> bool:
        # maps that are 0 outside an extracted brain (a prepared scan) are smoothed within the
        # foreground; the model's own outputs outside the object take part otherwise, as they
        # did when the thresholds were calibrated
        return s.foreground_only and self.result.prepared is not None

    def _check_used(self, s: CombineSettings) -> None:
        missing = set(s.used_weights()) - set(self.result.maps)
        if missing:
            raise InputError(
                f"the result has no {', '.join(sorted(missing))} map(s) to combine; "
                "localize with those maps"
            )

    def combined(
        self, settings: CombineSettings | None = None, cancel: Callable[[], bool] | None = None
    ) -> np.ndarray:
        """The combined map of the scan's shape (steps 1-4 of the module doc), float32, or
        float16 when every weighted component is (maps kept as float16), under
        ``settings`` (default: ``self.settings``). ``cancel`` is asked between components;
        when it says yes, :class:`~napari_vaeloc.errors.Cancelled` is raised."""
        s = self.settings if settings is None else settings
        key = self.combined_key(s)
        with self._lock:
            if key == self._combined_key and self._combined is not None:
                return self._combined
        out = self._combine(s, s.smoothing_mm, s.sharp_outline(), cancel)
        with self._lock:
            self._combined, self._combined_key = out, key
        return out

    def _combine(
        self,
        s: CombineSettings,
        smoothing_mm: float,
        also: float | None,
        cancel: Callable[[], bool] | None,
    ) -> np.ndarray:
        """Steps 1-4 under ``s`` at ``smoothing_mm`` (uncached); the smoothed components of
        the smoothing ``also`` stay cached next to this one's."""
        self._check_used(s)
        used = self._used(s)
        inside = self._inside(s)
        terms = {}
        for k in used:
            _stop_if(cancel)
            terms[k] = self._scaled(k, smoothing_mm, inside, also)
        _stop_if(cancel)
        fg = self.fg() if s.foreground_only else None
        # float16 when every weighted component is (the panel's maps of a large scan): it is
        # no finer than its terms, and it halves the largest array the panel holds
        half = bool(terms) and all(t.dtype == np.float16 for t in terms.values())
        dtype = np.float16 if half else np.float32
        return combine_terms(terms, used, fg, s.scan_normalise, self.result.shape, dtype)

    def outline_map(
        self, settings: CombineSettings | None = None, cancel: Callable[[], bool] | None = None
    ) -> np.ndarray:
        """The map the mask's parts are outlined on under ``settings`` (default:
        ``self.settings``): the combination at ``outline_smoothing_mm`` (step 5 of the module
        doc), or the combined map itself when the settings outline on it; cached, and its
        smoothed components are kept next to the combined map's, so that a threshold or
        weight move costs no smoothing."""
        s = self.settings if settings is None else settings
        sharp = s.sharp_outline()
        if sharp is None:
            return self.combined(s, cancel)
        key = self.combined_key(s.replace(smoothing_mm=sharp))
        with self._lock:
            if self._sharp is not None and self._sharp[0] == key:
                return self._sharp[1]
        out = self._combine(s, sharp, s.smoothing_mm, cancel)
        with self._lock:
            self._sharp = (key, out)
        return out

    def _scaled(
        self, name: str, smoothing_mm: float, inside: bool = True, also: float | None = None
    ) -> np.ndarray:
        """``map / scale`` of one component, smoothed (within the foreground when ``inside``);
        cached for this smoothing and ``also`` (the other one the settings use) only, float16
        when the map is."""
        key = (name, smoothing_mm, inside)
        cached = self._smooth_cache.get(key)
        if cached is not None:
            return cached
        factor = 1.0 / self.scale(name)[0]
        where, norm = (self.fg(), self._norm(smoothing_mm)) if inside else (None, None)
        values = self.result.maps[name]
        out = smooth(values, smoothing_mm, self.spacing, where, factor=factor, norm=norm)
        if values.dtype == np.float16:  # kept at the precision of the map it comes from
            out = out.astype(np.float16)
        with self._lock:
            kept = self._smooth_cache.items()
            cache = {k: v for k, v in kept if k[1] == smoothing_mm or k[1] == also}
            cache[key] = out
            self._smooth_cache = cache  # replaced whole: readers never see it half-changed
        return out

    def _norm(self, smoothing_mm: float) -> np.ndarray | None:
        """The foreground's own smoothing (the denominator of smoothing within it), cached for
        the current smoothing; None without smoothing."""
        if smoothing_mm <= 0:
            return None
        with self._lock:
            if self._norm_cache is not None and self._norm_cache[0] == smoothing_mm:
                return self._norm_cache[1]
        norm = smoothing_norm(self.fg(), smoothing_mm, self.spacing)
        with self._lock:
            self._norm_cache = (smoothing_mm, norm)
        return norm

    def mask(
        self, settings: CombineSettings | None = None, cancel: Callable[[], bool] | None = None
    ) -> np.ndarray:
        """uint8 mask of the combined map under ``settings`` (default: ``self.settings``): the
        voxels above the threshold, grown to the grow level, small parts removed (step 5 of
        the module doc); ``cancel`` as in :meth:`combined`."""
        s = self.settings if settings is None else settings
        combined = self.combined(s, cancel)
        key = s.mask_key()
        with self._lock:
            if self._mask is not None and self._mask_of is combined and self._mask_key == key:
                return self._mask
        _stop_if(cancel)
        n = min_voxels(s.min_size_mm3, self.spacing, combined.ndim)
        grow = s.grow_level()
        if grow is not None:
            labels, sizes = self._components(combined, grow)
            _stop_if(cancel)
            peaks = self._peaks(combined, labels, sizes)
            keep, level = outline_tables(peaks, sizes, n, s.threshold, grow, s.outline_fraction)
            if s.sharp_outline() is None:
                out = outline_mask(combined, labels, keep, level)
            else:
                out = self._outline_sharp(s, labels, sizes, keep, cancel)
        elif n > 1:
            labels, sizes = self._components(combined, s.threshold)
            out = keep_large(labels, sizes, n)
        else:
            out = threshold_mask(combined, s.threshold)
        voxels = int(np.count_nonzero(out))
        with self._lock:
            self._mask, self._mask_of, self._mask_key = out, combined, key
            self._mask_voxels = voxels
        return out

    def mask_voxels(self, mask: np.ndarray | None = None) -> int:
        """Voxels marked in ``mask`` (default: :meth:`mask` under the current settings). The
        cached mask's voxels were counted where it was made, so asking for it costs nothing."""
        mask = self.mask() if mask is None else mask
        with self._lock:
            return self._mask_voxels if mask is self._mask else int(np.count_nonzero(mask))

    def mask_volume_ml(self, mask: np.ndarray | None = None) -> float:
        """Volume in millilitres of ``mask`` (as :meth:`mask_voxels`): its voxels times the
        scan's voxel volume."""
        return self.mask_voxels(mask) * float(np.prod(self.spacing)) / 1000.0

    def cut_note(self, mask: np.ndarray | None = None) -> str | None:
        """For a mask (default :meth:`mask`) with parts that reach the brain the preparation
        left unscored along a cut of the field of view (``prepared.cut_band``, touching it
        across a face, edge or corner): their volume and count, and that what they mark may
        continue there; None otherwise (no cut, or no part reaches it). Kept for the last mask
        (the panel's workers compute it, its GUI thread reads it)."""
        prepared = self.result.prepared
        band = getattr(prepared, "cut_band", None)
        if band is None or band.size == 0:
            return None
        mask = self.mask() if mask is None else mask
        with self._lock:
            if self._cut_note is not None and self._cut_note[0] is mask:
                return self._cut_note[1]
        note = self._cut_note_of(mask, band)
        with self._lock:
            self._cut_note = (mask, note)
        return note

    def _cut_note_of(self, mask: np.ndarray, band: np.ndarray) -> str | None:
        from scipy.ndimage import binary_dilation

        from .prepare import CUT_EDGE_MM
        from .preprocess import bounding_box

        shape = self.result.shape
        marked = np.asarray(mask).reshape(shape) != 0
        if not marked.any():
            return None
        near = np.zeros(shape, bool)
        near.reshape(-1)[band] = True
        box = bounding_box(near, margin=1)
        near[box] = binary_dilation(near[box], np.ones((3,) * len(shape), bool))
        labels, sizes = label_components(marked)
        hit = np.unique(labels[near & marked])
        hit = hit[hit > 0]
        if hit.size == 0:
            return None
        ml = float(sizes[hit].sum()) * float(np.prod(self.spacing)) / 1000.0
        which = "1 part" if hit.size == 1 else f"{hit.size} parts"
        return (
            f"{which} of the mask ({ml:.1f} ml) touch{'es' if hit.size == 1 else ''} the brain "
            f"left unscored within {CUT_EDGE_MM:g} mm of the field-of-view cut: what "
            f"{'it marks' if hit.size == 1 else 'they mark'} may continue there"
        )

    def _components(self, combined: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        """Connected components of ``combined > level`` and their sizes, cached for the
        last (combined map, level)."""
        parts = self._parts
        if parts is not None and parts[0] is combined and parts[1] == level:
            return parts[2], parts[3]
        labels, sizes = label_components(above(combined, level))
        with self._lock:
            self._parts = (combined, level, labels, sizes)
            self._peak_cache = None
        return labels, sizes

    # -- the outline on a sharper map (step 5) ------------------------------------------------
    def _sharp_key(self, s: CombineSettings) -> tuple:
        """What the map ``s`` outlines its parts on depends on (its :meth:`combined_key`)."""
        return self.combined_key(s.replace(smoothing_mm=s.sharp_outline() or 0.0))

    def _outline_sharp(
        self,
        s: CombineSettings,
        labels: np.ndarray,
        sizes: np.ndarray,
        keep: np.ndarray,
        cancel: Callable[[], bool] | None,
    ) -> np.ndarray:
        """uint8 mask: the voxels of the kept components at or above ``outline_fraction`` of
        their peak on the sharper map, without the outline's pieces smaller than
        :data:`MIN_OUTLINE_PIECE_MM3`. Every part's outline is made once for these components
        and this sharper map (cached), so a threshold move only picks the kept ones."""
        outline = self._known_sharp_outline(s, labels)
        if outline is None:
            outline = self._outline_every_part(s, labels, sizes, cancel)
        return select_parts(outline, labels, keep)

    def _outline_every_part(
        self,
        s: CombineSettings,
        labels: np.ndarray,
        sizes: np.ndarray,
        cancel: Callable[[], bool] | None,
    ) -> np.ndarray:
        """uint8: every component's outline on the sharper map of ``s`` (at
        ``outline_fraction`` of its peak there), loose pieces dropped; cached.
        Unsmoothed (``outline_smoothing_mm`` 0), that map is read at the components' voxels
        alone, slab by slab: no volume is made for it."""
        every = np.ones(len(sizes), np.uint8)
        every[0] = 0
        if s.sharp_outline():
            sharp = self.outline_map(s, cancel)
            _stop_if(cancel)
            peaks = component_peaks(sharp, labels, len(sizes))
            out = outline_mask(sharp, labels, every, fraction_levels(peaks, s.outline_fraction))
        else:
            stats = self._unsmoothed_stats(s)
            peaks = np.zeros(len(sizes), np.float32)
            for part in _slabs(labels.shape):
                lab = labels[part]
                inside = lab > 0
                if inside.any():
                    values = self._unsmoothed(s, part, inside, stats)
                    np.maximum.at(peaks, lab[inside], values)
            _stop_if(cancel)
            level = fraction_levels(peaks, s.outline_fraction)
            out = host_array(labels.shape, np.uint8)
            for part in _slabs(labels.shape):
                lab = labels[part]
                inside = lab > 0
                slab = np.zeros(lab.shape, np.uint8)
                if inside.any():
                    values = self._unsmoothed(s, part, inside, stats)
                    slab[inside] = values >= level[lab[inside]]
                out[part] = slab
        _stop_if(cancel)
        drop_loose_pieces(out, min_voxels(MIN_OUTLINE_PIECE_MM3, self.spacing, out.ndim))
        with self._lock:
            self._sharp_outline = (labels, self._sharp_key(s), out)
        return out

    def _known_sharp_outline(self, s: CombineSettings, labels: np.ndarray) -> np.ndarray | None:
        """Every part's outline (:meth:`_outline_every_part`) of the components ``labels`` on
        the sharper map of ``s``, when known."""
        known = self._sharp_outline
        if known is not None and known[0] is labels and known[1] == self._sharp_key(s):
            return known[2]
        return None

    def _unsmoothed_stats(self, s: CombineSettings) -> tuple[float, float] | None:
        """The per-scan median and spread of the unsmoothed combination (step 4 at smoothing
        0; None without per-scan normalisation), from the weighted sum at the voxels
        :func:`robust_stats` samples, so that they equal the whole map's; cached."""
        if not s.scan_normalise:
            return None
        key = self._sharp_key(s)
        cached = self._raw_stats
        if cached is not None and cached[0] == key:
            return cached[1]
        fg = self.fg()
        flat = fg.reshape(-1) if fg.any() else None
        positions = _sample_positions(flat, fg.size)
        if isinstance(positions, slice):
            positions = np.arange(fg.size)[positions]
        at = np.unravel_index(positions, fg.shape)  # any memory order, no copy of a map
        total = self._unsmoothed_sum(s, lambda m: np.asarray(m[at]))
        stats = robust_stats(total) if total is not None else (0.0, 1.0)
        with self._lock:
            self._raw_stats = (key, stats)
        return stats

    def _unsmoothed_sum(
        self, s: CombineSettings, take: Callable[[np.ndarray], np.ndarray]
    ) -> np.ndarray | None:
        """The weighted sum of the scaled, unsmoothed components at the voxels ``take(map)``
        reads from each map, float32, in :func:`weighted_sum`'s order and arithmetic; None
        when no weight is used."""
        total = None
        for k, w in self._used(s).items():
            factor = np.float32(1.0 / self.scale(k)[0])
            term = np.multiply(take(self.result.maps[k]), factor, dtype=np.float32)
            term *= np.float32(w)
            total = term if total is None else np.add(total, term, out=total)
        return total

    def _unsmoothed(
        self,
        s: CombineSettings,
        region: slice | tuple,
        inside: np.ndarray,
        stats: tuple[float, float] | None,
    ) -> np.ndarray:
        """The unsmoothed combination (steps 1-4 at smoothing 0) at the voxels ``inside``
        (bool, of ``region``'s shape) of ``region``: float32, one value per such voxel."""
        total = self._unsmoothed_sum(s, lambda m: np.asarray(m[region])[inside])
        if total is None:
            return np.zeros(int(np.count_nonzero(inside)), np.float32)
        if stats is not None:
            total = robust_z(total, None, stats, out=total)
            np.maximum(total, 0, out=total)
        if s.foreground_only:
            total *= np.asarray(self.fg()[region])[inside]
        return total

    def _sharp_plane(self, s: CombineSettings, axis: int, index: int) -> np.ndarray | None:
        """The slice of the map ``s`` outlines its parts on, when it is a sharper one and can
        be had without whole-volume work (a smoothed one when cached; an unsmoothed one unless
        a map it weights is deferred, not made yet: its median needs the whole map); else
        None, and a preview outlines on the combined map's slice (approximate)."""
        sharp = s.sharp_outline()
        if sharp is None:
            return None
        if sharp:
            cached = self._sharp
            ok = cached is not None and cached[0] == self._sharp_key(s)
            return plane(cached[1], axis, index) if ok else None
        if any(self.result.maps.is_deferred(k) for k in self._used(s)):
            return None  # making it goes over the whole volume
        key: list[slice] = [slice(None)] * len(self.result.shape)
        key[axis] = slice(index, index + 1)
        thin = list(self.result.shape)
        thin[axis] = 1
        values = self._unsmoothed(s, tuple(key), np.ones(thin, bool), self._unsmoothed_stats(s))
        return values.reshape([n for i, n in enumerate(thin) if i != axis])

    def _peaks(self, combined: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Each component's peak (:func:`component_peaks`), cached for the last labels."""
        peaks = self._peak_cache
        if peaks is not None and peaks[0] is labels:
            return peaks[1]
        out = component_peaks(combined, labels, len(sizes))
        with self._lock:
            self._peak_cache = (labels, out)
        return out

    def combination(self, settings: CombineSettings | None = None) -> Combination:
        """Combined map, mask and the scales of the weighted components."""
        s = self.settings if settings is None else settings
        scales = {k: self.scale(k)[0] for k in self._used(s)}
        calibrated = bool(scales) and all(self.scale(k)[1] for k in scales)
        return Combination(self.combined(s), self.mask(s), scales, calibrated)

    def cached(self, settings: CombineSettings | None = None) -> Combination | None:
        """The combination under ``settings`` when both its combined map and its mask are
        cached (nothing is computed), else None."""
        s = self.settings if settings is None else settings
        with self._lock:
            combined, mask = self._combined, self._mask
            if combined is None or self._combined_key != self.combined_key(s):
                return None
            if mask is None or self._mask_of is not combined:
                return None
            if self._mask_key != s.mask_key():
                return None
        scales = {k: self.scale(k)[0] for k in self._used(s)}
        calibrated = bool(scales) and all(self.scale(k)[1] for k in scales)
        return Combination(combined, mask, scales, calibrated)

    def release(self, array: np.ndarray) -> None:
        """Forget ``array`` if it is the cached combined map or mask: its owner (a viewer layer
        whose slices are previewed in place) may now change it; the next call recomputes."""
        with self._lock:
            if array is self._combined:
                self._combined, self._combined_key = None, None
            if array is self._combined or array is self._mask or array is self._mask_of:
                self._mask, self._mask_of, self._mask_key = None, None, None
            if self._parts is not None and self._parts[0] is array:
                self._parts, self._peak_cache = None, None

    # -- one slice first -------------------------------------------------------------------
    def slice_preview(
        self,
        settings: CombineSettings,
        axis: int,
        index: int,
        compute: bool = False,
    ) -> SlicePreview | None:
        """The combined map and mask of the slice ``index`` along ``axis`` under ``settings``,
        from the cached components, without touching the rest of the volume.

        The combined map's slice is exact to float32 rounding (a component at a new smoothing
        is smoothed on the slab of slices that reach the slice, when ``compute``); with
        per-scan normalisation its median and spread come from a subsample of the foreground
        (approximate). The mask's slice is exact unless a minimum size or a grow level is set
        and the components of this map are not cached (then the threshold and the growth are
        applied within the slice: approximate).

        Returns:
            the preview, or None when a component at this smoothing is not cached, or a map
            it needs is deferred (not made yet), and ``compute`` is false.
        """
        s = settings
        self._check_used(s)
        fg_sl = plane(self.fg(), axis, index)
        exact = True
        with self._lock:
            combined = self._combined
            same = combined is not None and self._combined_key == self.combined_key(s)
        if same:
            comb_sl = plane(combined, axis, index)
        else:
            used = self._used(s)
            inside = self._inside(s)
            terms = {}
            for k in used:
                part = self._scaled_slice(k, s.smoothing_mm, inside, axis, index, compute)
                if part is None:
                    return None
                terms[k] = part
            total = weighted_sum(terms, used, shape=fg_sl.shape)
            stats = None
            if s.scan_normalise:
                stats = self._sample_stats(s, compute)
                if stats is None:
                    return None
                exact = False
            comb_sl = finish(total, fg_sl if s.foreground_only else None, s.scan_normalise, stats)
        mask_sl, mask_exact = self._mask_slice(s, comb_sl, combined if same else None, axis, index)
        return SlicePreview(comb_sl, mask_sl, exact and mask_exact, not same)

    def _mask_slice(
        self,
        s: CombineSettings,
        comb_sl: np.ndarray,
        combined: np.ndarray | None,
        axis: int,
        index: int,
    ) -> tuple[np.ndarray, bool]:
        """The mask's slice (uint8) and whether it is exact: from the cached components of
        ``combined`` (the whole combined map under ``s``, or None) when they fit ``s``;
        otherwise the threshold (and growth) applied within the slice alone."""
        n = min_voxels(s.min_size_mm3, self.spacing, self.fg().ndim)
        grow = s.grow_level()
        if n <= 1 and grow is None:
            return above(comb_sl, s.threshold).astype(np.uint8), True
        level = s.threshold if grow is None else grow
        parts, peaks = self._parts, self._peak_cache
        if combined is not None and parts is not None and parts[0] is combined:
            if parts[1] == level:
                labels_sl = plane(parts[2], axis, index)
                if grow is None:
                    return _keep_table(parts[3], n)[labels_sl], True
                if peaks is not None and peaks[0] is parts[2]:
                    keep, lv = outline_tables(
                        peaks[1], parts[3], n, s.threshold, grow, s.outline_fraction
                    )
                    if s.sharp_outline() is None:
                        return outline_mask(comb_sl, labels_sl, keep, lv), True
                    known = self._known_sharp_outline(s, parts[2])
                    if known is not None:
                        return select_parts(plane(known, axis, index), labels_sl, keep), True
        if grow is None:
            return above(comb_sl, s.threshold).astype(np.uint8), False
        sharp_sl = self._sharp_plane(s, axis, index)
        return outline_slice(comb_sl, s.threshold, grow, s.outline_fraction, sharp_sl), False

    def _scaled_slice(
        self, name: str, smoothing_mm: float, inside: bool, axis: int, index: int, compute: bool
    ) -> np.ndarray | None:
        """One slice of :meth:`_scaled`: from its cache, or (with ``compute``) smoothed on the
        slab of slices within the Gaussian's reach (exact: the slab's borders lie beyond it,
        or are the volume's). A deferred map that can make the slab alone
        (:meth:`~napari_vaeloc.mapset.MapSet.region`) is not made whole for it."""
        factor = np.float32(1.0 / self.scale(name)[0])
        maps = self.result.maps
        deferred = maps.is_deferred(name)
        if deferred and not compute:
            return None  # making it goes over the whole volume
        if smoothing_mm > 0:
            cached = self._smooth_cache.get((name, smoothing_mm, inside))
            if cached is not None:
                return plane(cached, axis, index)
            if not compute:
                return None
        reach = 0
        if smoothing_mm > 0:
            reach = int(3.0 * smoothing_mm / max(self.spacing[axis], 1e-6) + 0.5)
        lo, hi = max(index - reach, 0), min(index + reach + 1, self.result.shape[axis])
        key = [slice(None)] * len(self.result.shape)
        key[axis] = slice(lo, hi)
        slab = tuple(key)
        part = maps.region(name, slab) if deferred else None
        if part is None:
            part = maps[name][slab]
        if smoothing_mm <= 0:
            return plane(part, axis, index - lo) * factor
        where = self.fg()[slab] if inside else None
        smoothed = smooth(part, smoothing_mm, self.spacing, where, factor=factor)
        return plane(smoothed, axis, index - lo)

    def _map(self, name: str, compute: bool) -> np.ndarray | None:
        """The map ``name`` for a preview: None when the engine deferred it
        (:class:`~napari_vaeloc.mapset.MapSet`) and ``compute`` is false (making it goes
        over the whole volume)."""
        maps = self.result.maps
        return None if not compute and maps.is_deferred(name) else maps[name]

    def _sample_stats(self, s: CombineSettings, compute: bool) -> tuple[float, float] | None:
        """Median and robust spread of the weighted sum on an even subsample of about
        :data:`PREVIEW_SAMPLE` foreground voxels (for previews under per-scan normalisation)."""
        used = self._used(s)
        inside = self._inside(s)
        if any(self.result.maps.is_deferred(k) for k in used):
            if not compute:
                return None
            estimate = self._coarse_stats(s, used, inside)
            if estimate is not None:
                return estimate
        if self._sample is None:
            where = self.fg()
            fg = where.reshape(-1) if where.any() else None
            self._sample = _sample_positions(fg, where.size, PREVIEW_SAMPLE)
        idx = self._sample
        terms = {}
        for k in used:
            comp = self._smooth_cache.get((k, s.smoothing_mm, inside))
            if comp is None and s.smoothing_mm > 0:
                if not compute:
                    return None
                comp = self._scaled(k, s.smoothing_mm, inside)
            if comp is None:
                held = self._map(k, compute)
                if held is None:
                    return None
                values = held.reshape(-1)[idx]
                terms[k] = values * np.float32(1.0 / self.scale(k)[0])
            else:
                terms[k] = comp.reshape(-1)[idx]
        total = weighted_sum(terms, used, shape=idx.shape)
        return robust_stats(total)

    def _coarse_stats(
        self, s: CombineSettings, used: dict[str, float], inside: bool
    ) -> tuple[float, float] | None:
        """Median and robust spread of the weighted sum estimated on every ``step``-th voxel
        along each axis (about :data:`COARSE_VOXELS` voxels), for a preview that weights a map
        not made yet: a component with a smoothed cache is subsampled from it (exact values),
        any other is made on that grid alone and smoothed there (approximate: sigma spans
        fewer voxels). None when a map cannot make that grid alone."""
        shape = self.result.shape
        step = max(1, math.ceil((float(np.prod(shape)) / COARSE_VOXELS) ** (1.0 / 3.0)))
        index = tuple(slice(0, n, step) for n in shape)
        fg = self.fg()[index]
        spacing = tuple(float(sp) * step for sp in self.spacing)
        terms = {}
        for k in used:
            cached = self._smooth_cache.get((k, s.smoothing_mm, inside))
            if cached is not None:
                terms[k] = cached[index]
                continue
            part = self.result.maps.region(k, index)
            if part is None:
                return None
            factor = 1.0 / self.scale(k)[0]
            where = fg if inside else None
            terms[k] = smooth(part, s.smoothing_mm, spacing, where, factor=factor)
        total = weighted_sum(terms, used, shape=fg.shape)
        return robust_stats(total, fg if fg.any() else None)

    # -- threshold <-> healthy false-positive rate -----------------------------------------
    def uses_default_combination(self) -> bool:
        """True when weights, smoothing and normalisation are those the model's FPR table was
        calibrated for."""
        d = self.default_settings()
        return calibrated_combination(self.settings, self.calibration, d) and math.isclose(
            self.settings.smoothing_mm, d.smoothing_mm
        )

    def fpr_table(self) -> list[tuple[float, float]]:
        """(threshold, fpr) pairs that hold for the current settings (:func:`fpr_pairs`)."""
        return fpr_pairs(self.settings, self.calibration, self.default_settings())

    def levels_source(self) -> str | None:
        """Where the levels of :meth:`fpr_table` come from when the settings smooth otherwise
        than the default ("calibrated at 3 mm", "interpolated between the 3 and 4 mm
        calibrations"); None at the default smoothing or without levels."""
        d = self.default_settings()
        if math.isclose(self.settings.smoothing_mm, d.smoothing_mm) or not self.fpr_table():
            return None
        return self.calibration.smoothing_source(self.settings.smoothing_mm)

    def uncalibrated_smoothing(self) -> str | None:
        """Why the current settings have no levels when only their smoothing lacks them
        ("smoothing 10 mm: the model is calibrated at 0-8 mm"), else None."""
        s, cal = self.settings, self.calibration
        if self.fpr_table() or not calibrated_combination(s, cal, self.default_settings()):
            return None
        sigmas = list(cal.smoothing_tables())
        if not sigmas:
            return None
        span = f"{sigmas[0]:g}-{sigmas[-1]:g} mm" if len(sigmas) > 1 else f"{sigmas[0]:g} mm"
        return f"smoothing {s.smoothing_mm:g} mm: the model is calibrated at {span}"

    def finer_smoothing(self) -> float | None:
        """:data:`SMALL_LESION_SMOOTHING_MM` when the settings smooth more than it and the
        model has levels there (so a finer look keeps the healthy rate), else None."""
        if self.settings.smoothing_mm <= SMALL_LESION_SMOOTHING_MM or not self.fpr_table():
            return None
        finer = self.settings.replace(smoothing_mm=SMALL_LESION_SMOOTHING_MM)
        known = fpr_pairs(finer, self.calibration, self.default_settings())
        return SMALL_LESION_SMOOTHING_MM if known else None

    def small_lesion_hint(self, setting: str) -> str | None:
        """For an empty mask: what it does not rule out, and that ``setting`` (how the front
        sets a smoothing, e.g. "--smoothing {mm}") looks at a finer scale with its threshold at
        the same healthy rate (a promise of a look, not of a find: in a real 1 mm head it
        found a bright 0.5 ml lesion that 6 mm missed, outlined another one in the deep white
        matter too large, and missed a 0.5 ml one 50 % darker than its tissue); None when
        there is nothing to say.

        With a card that measured its default mask on real anatomy
        (``Calibration.individual_lesions``): at the default mask, the lesion volume under
        which it missed most lesions there (:func:`missed_lesions`); at other settings, that
        they were not measured and what the default missed. Without a record: "lesions under
        about 1 ml" where a finer calibrated smoothing exists (:meth:`finer_smoothing`), and
        at that smoothing or finer, with the model's levels there, that faint small lesions
        are not ruled out either."""
        finer = self.finer_smoothing()
        look = (
            f"{setting.format(mm=f'{finer:g}')} looks at a finer scale, its threshold at the "
            "same healthy rate"
            if finer is not None
            else None
        )
        measured = self._measured_misses()
        if measured is not None:
            return "; ".join(m for m in (measured, look) if m)
        if finer is None:
            fine = self.settings.smoothing_mm <= SMALL_LESION_SMOOTHING_MM
            if not fine or not fpr_pairs(self.settings, self.calibration, self.default_settings()):
                return None
            return (
                "an empty mask does not rule out small faint lesions: at a "
                f"{SMALL_LESION_SMOOTHING_MM:g} mm smoothing a 0.5 ml lesion 50 % darker than its "
                "tissue stayed below the threshold in a real 1 mm head"
            )
        return (
            "an empty mask does not rule out lesions under about 1 ml at a "
            f"{self.settings.smoothing_mm:g} mm smoothing: {look}"
        )

    def _measured_misses(self) -> str | None:
        """What the default mask missed on the benchmark's real anatomy, in words, when the
        card measured it (:func:`missed_lesions`); away from the default mask, that these
        settings were not measured and what the default missed. None without a record."""
        cal = self.calibration
        if cal is None or not cal.individual_lesions:
            return None
        m = missed_lesions(cal.individual_lesions)
        if self.is_default_mask():
            return (
                f"an empty mask does not rule out {m.not_ruled_out()}: on real anatomy this "
                f"model's default mask {m.marked()}"
            )
        return (
            "an empty mask does not rule out lesions: these settings were not measured on real "
            f"anatomy, where the default mask {m.marked()}"
        )

    def fpr_for_threshold(self, threshold: float) -> float | None:
        """Healthy false-positive rate of ``threshold`` (:func:`fpr_at`); None without a
        table."""
        return fpr_at(self.fpr_table(), threshold)

    def mask_fpr(self, settings: CombineSettings | None = None) -> float | None:
        """The healthy false-positive rate of the mask itself (the calibration's ``mask_fpr``,
        measured on held-out healthy brains) when ``settings`` (default: ``self.settings``)
        are the calibrated default's in every step, else None."""
        cal = self.calibration
        if cal is None or cal.mask_fpr is None or not self.is_default_mask(settings):
            return None
        return float(cal.mask_fpr)

    def is_default_mask(self, settings: CombineSettings | None = None) -> bool:
        """Whether ``settings`` (default: ``self.settings``) make the card's default mask: the
        calibrated combination, and the default's in every later step."""
        s = self.settings if settings is None else settings
        if not self.uses_default_combination():
            return False
        default = self.default_settings()
        same_mask = _same_key(s.mask_key(), default.mask_key())
        return same_mask and self.combined_key(s) == self.combined_key(default)

    def threshold_for_fpr(self, fpr: float) -> float | None:
        """Inverse of :meth:`fpr_for_threshold` (:func:`threshold_at`)."""
        return threshold_at(self.fpr_table(), fpr)


def calibrated_combination(
    settings: CombineSettings, calibration: Calibration | None, default: CombineSettings
) -> bool:
    """Whether ``settings`` weight the maps and normalise the scan as the combination the
    model's false-positive tables were calibrated for (``default``: the card's settings)."""
    if calibration is None:
        return False
    cal_w = calibration.combined_weights or default.weights
    return (
        settings.used_weights() == {k: float(v) for k, v in cal_w.items() if v}
        and settings.scan_normalise == default.scan_normalise
    )


def fpr_pairs(
    settings: CombineSettings, calibration: Calibration | None, default: CombineSettings
) -> list[tuple[float, float]]:
    """(threshold, fpr) pairs, sorted by threshold, that hold for ``settings``: the model's
    default table at the default smoothing, the table of another smoothing where the
    calibration has one (``Calibration.fpr_table``: calibrated at that sigma, or interpolated
    between two); empty for other weights or normalisation, or a smoothing beyond the
    calibrated ones."""
    if not calibrated_combination(settings, calibration, default):
        return []
    if math.isclose(settings.smoothing_mm, default.smoothing_mm):
        return calibration.fpr_table()
    return calibration.fpr_table(settings.smoothing_mm)


def fpr_at(pairs: list[tuple[float, float]], threshold: float) -> float | None:
    """Healthy false-positive rate of ``threshold`` under the (threshold, fpr) ``pairs``,
    interpolated in log space between the calibrated levels (the nearest level outside them);
    None without pairs."""
    if not pairs:
        return None
    thr = np.array([p[0] for p in pairs])
    logf = np.log10([p[1] for p in pairs])
    return float(10 ** np.interp(threshold, thr, logf))


def threshold_at(pairs: list[tuple[float, float]], fpr: float) -> float | None:
    """Inverse of :func:`fpr_at`: the threshold of the healthy false-positive rate ``fpr``."""
    if not pairs:
        return None
    thr = np.array([p[0] for p in pairs])[::-1]
    logf = np.log10([p[1] for p in pairs])[::-1]
    return float(np.interp(math.log10(fpr), logf, thr))


def at_smoothing(
    settings: CombineSettings,
    card: ModelCard,
    smoothing_mm: float,
    calibration: Calibration | None = None,
) -> CombineSettings:
    """``settings`` at the smoothing ``smoothing_mm`` (sigma, mm) with their levels carried
    over: where the model's calibration (``calibration``, default the card's) holds levels at
    both smoothings (:func:`fpr_pairs`), the threshold moves to the level of the healthy
    false-positive rate it had (when it lay within the calibrated levels) and the grow level
    to the card's ``grow_fpr`` level; otherwise only the smoothing changes. So a finer
    smoothing keeps the threshold's healthy rate instead of its number.

    Raises:
        InputError: a negative or non-finite smoothing.
    """
    new = settings.replace(smoothing_mm=smoothing_mm)
    cal = card.calibration if calibration is None else calibration
    default = CombineSettings.from_card(card)
    before, after = fpr_pairs(settings, cal, default), fpr_pairs(new, cal, default)
    if not before or not after:
        return new
    changes = {}
    if before[0][0] <= settings.threshold <= before[-1][0]:
        changes["threshold"] = threshold_at(after, fpr_at(before, settings.threshold))
    grow_fpr = card.defaults.grow_fpr
    if settings.grow_threshold is not None and grow_fpr is not None:
        changes["grow_threshold"] = threshold_at(after, grow_fpr)
    return new.replace(**changes)


def _same_key(a: tuple, b: tuple) -> bool:
    """Whether two :meth:`CombineSettings.mask_key` tuples name the same mask: numbers equal to
    a relative 1e-6 (a slider hands back its value rounded to about six digits), the rest
    exactly."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9):
                return False
        elif x != y:
            return False
    return True


def weighted_sum(
    terms: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    scales: Mapping[str, float] | None = None,
    shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """``sum_k w_k * terms_k / scale_k`` over the non-zero weights (scale 1 when ``scales`` is
    None), float32; zeros of ``shape`` when no weight is used. The one formula of the combined
    map (step 2 of the module doc), also used by the calibration after training.

    Raises:
        KeyError: a weighted term is missing.
    """
    used = {k: float(w) for k, w in weights.items() if w}
    if not used:
        if shape is None:
            raise ValueError("no weights and no shape")
        return np.zeros(shape, dtype=np.float32)
    total: np.ndarray | None = None
    for k, w in used.items():
        factor = np.float32(w / (scales[k] if scales is not None else 1.0))
        if total is None:
            total = np.multiply(terms[k], factor, out=host_array(np.shape(terms[k])))
            flat = total.reshape(-1)
            continue
        term = np.asarray(terms[k]).reshape(-1)
        for start in range(0, flat.size, CHUNK_VOXELS):  # no full-size temporary
            part = slice(start, start + CHUNK_VOXELS)
            flat[part] += term[part] * factor
    return total


def combine_terms(
    terms: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    foreground: np.ndarray | None,
    scan_normalise: bool,
    shape: tuple[int, ...],
    dtype=np.float32,
) -> np.ndarray:
    """:func:`weighted_sum` of ``terms`` (already scaled) then :func:`finish`, as ``dtype``:
    float32, or float16, which is computed chunk by chunk in float32 and rounded once at the
    end (the per-scan median and spread come from the float32 sum at the same voxels
    :func:`robust_stats` samples), so that no float32 volume is ever made.
    """
    if np.dtype(dtype) == np.float32:
        return finish(weighted_sum(terms, weights, shape=shape), foreground, scan_normalise)
    used = {k: np.float32(w) for k, w in weights.items() if w}
    flat_terms = {k: np.asarray(terms[k]).reshape(-1) for k in used}
    size = int(np.prod(shape, dtype=np.int64))

    def summed(index: slice | np.ndarray) -> np.ndarray:
        acc = None
        for k, w in used.items():  # weighted_sum's order and arithmetic: equal float32 sums
            term = np.multiply(flat_terms[k][index], w, dtype=np.float32)
            acc = term if acc is None else np.add(acc, term, out=acc)
        return acc

    stats = None
    if scan_normalise:
        fg = foreground.reshape(-1) if foreground is not None and foreground.any() else None
        stats = robust_stats(summed(_sample_positions(fg, size)))
    out = host_array(shape, dtype)
    flat = out.reshape(-1)
    flat_fg = foreground.reshape(-1) if foreground is not None else None
    for start in range(0, size, CHUNK_VOXELS):
        part = slice(start, min(size, start + CHUNK_VOXELS))
        acc = summed(part)
        if stats is not None:
            acc = robust_z(acc, None, stats, out=acc)
            np.maximum(acc, 0, out=acc)
        if flat_fg is not None:
            np.multiply(acc, flat_fg[part], out=acc)
        flat[part] = acc
    return out


def _sample_positions(
    foreground: np.ndarray | None, size: int, limit: int | None = None
) -> slice | np.ndarray:
    """The flat positions :func:`robust_stats` samples: every step-th voxel of the flat
    ``foreground`` (all ``size`` voxels when None), at most about ``limit`` of them (default
    :data:`ROBUST_SAMPLE`), found chunk by chunk (an index of the whole foreground would be 8
    bytes per voxel)."""
    limit = ROBUST_SAMPLE if limit is None else limit
    if foreground is None:
        return slice(0, size, max(1, size // limit))
    step = max(1, int(np.count_nonzero(foreground)) // limit)
    picks, seen = [], 0
    for start in range(0, size, CHUNK_VOXELS):
        found = np.flatnonzero(foreground[start : start + CHUNK_VOXELS]) + start
        picks.append(found[(-seen) % step :: step])
        seen += found.size
    return np.concatenate(picks)


def _fallback_scale(values: np.ndarray, foreground: np.ndarray | None) -> float:
    vals = values[foreground] if foreground is not None and foreground.any() else values.ravel()
    step = max(1, vals.size // 2_000_000)
    v = float(np.percentile(vals[::step], FALLBACK_PERCENTILE))
    return v if v > 0 else float(np.abs(vals).max() or 1.0)


#: Gaussian smoothing truncates its kernel at this many sigmas (the tail beyond holds 0.3 % of
#: the weight; scipy's default is 4)
SMOOTHING_TRUNCATE = 3.0


def gaussian_matrix(n: int, sigma: float, truncate: float = SMOOTHING_TRUNCATE) -> np.ndarray:
    """(n, n) float64 matrix of 1D Gaussian smoothing along an axis of ``n`` samples: row ``i``
    holds the weights of sample ``i``'s neighbours, ``exp(-d^2 / 2 sigma^2)`` for offsets
    ``|d| <= int(truncate * sigma + 0.5)``, normalised to sum 1, with nearest-value borders
    (offsets beyond an end take the end sample: that weight is added to it). ``sigma`` in
    samples (> 0). ``matrix @ v`` equals ``scipy.ndimage.gaussian_filter1d(v, sigma,
    mode="nearest", truncate=truncate)``."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    rows = np.repeat(np.arange(n), offsets.size)
    cols = np.clip(np.arange(n)[:, None] + offsets[None, :], 0, n - 1).ravel()
    matrix = np.zeros((n, n))
    np.add.at(matrix, (rows, cols), np.tile(weights, n))
    return matrix


def smooth(
    values: np.ndarray,
    smoothing_mm: float,
    spacing: tuple[float, ...],
    where: np.ndarray | None = None,
    *,
    factor: float = 1.0,
    norm: np.ndarray | None = None,
) -> np.ndarray:
    """3D Gaussian smoothing with sigma ``smoothing_mm`` (mm, per-axis voxels from ``spacing``)
    of ``values`` times ``factor``, float32 of the values' shape; ``values * factor`` when
    ``smoothing_mm`` is 0. Truncated at :data:`SMOOTHING_TRUNCATE` sigmas, nearest-value borders.

    Separable: one matrix product per axis with :func:`gaussian_matrix` (torch, on the CPU's
    threads; chunk by chunk of the other axes, so beyond the result only two chunks of
    :data:`CHUNK_VOXELS` are held). A dense matrix does more multiplications than the
    kernel's taps but runs at the machine's matrix-product rate: on a 193x229x193 volume at
    sigma 8 voxels, 4x faster than ``scipy.ndimage.gaussian_filter`` on one thread, equal to
    it within 1e-6 of the maximum.

    With ``where`` (bool, the values' shape) the smoothing is normalised to it (normalised
    convolution, Knutsson & Westin 1993): ``G * (v 1_where) / G * 1_where`` inside ``where``,
    0 outside, so values outside the object (background, or zeros outside an extracted brain)
    never leak in. Still linear in ``values``. ``norm``: ``G * 1_where`` when already known
    (:func:`smoothing_norm`), so that several maps smoothed within one region compute it once.
    """
    if smoothing_mm <= 0:
        out = np.asarray(values, dtype=np.float32)
        return out * np.float32(factor) if factor != 1.0 else out
    if where is None:
        return _gaussian_3d(values, smoothing_mm, spacing, factor)
    num = _gaussian_3d(values, smoothing_mm, spacing, factor, where=where)
    den = smoothing_norm(where, smoothing_mm, spacing) if norm is None else norm
    inside = where & (den > 1e-6)
    np.divide(num, den, out=num, where=inside)  # in place: one float32 array of the volume
    outside = np.logical_not(inside, out=inside)
    np.copyto(num, 0.0, where=outside)
    return num


def smoothing_norm(where: np.ndarray, smoothing_mm: float, spacing: tuple[float, ...]):
    """``G * 1_where``: the denominator of :func:`smooth`'s normalised smoothing, float32."""
    return _gaussian_3d(where, smoothing_mm, spacing)


def _gaussian_3d(
    values: np.ndarray,
    smoothing_mm: float,
    spacing: tuple[float, ...],
    factor: float = 1.0,
    where: np.ndarray | None = None,
) -> np.ndarray:
    """Separable Gaussian smoothing of ``values * factor`` (any number of axes; float32, a new
    array); with ``where``, of the values inside it (0 outside)."""
    import torch

    out = host_array(np.shape(values), np.float32, zero=where is not None)
    if where is None:
        out[...] = values
    else:
        np.copyto(out, values, where=where, casting="same_kind")
    t = torch.from_numpy(out)
    pending = float(factor)  # carried by the first product
    for axis, n in enumerate(out.shape):
        if n == 1:
            continue
        sigma = smoothing_mm / max(float(spacing[axis]), 1e-6)
        matrix = torch.from_numpy((gaussian_matrix(n, sigma) * pending).astype(np.float32))
        pending = 1.0
        _apply_along(t, matrix, axis, int(SMOOTHING_TRUNCATE * sigma + 0.5))
    if pending != 1.0:
        t.mul_(pending)
    return out


def _apply_along(t, matrix, axis: int, radius: int | None = None) -> None:
    """``t`` (contiguous) <- ``matrix`` (n, n) applied along ``axis`` (of length n), in place,
    chunk by chunk: ``t`` seen as (P, n, Q), the chunks run over P (or over Q when P is 1),
    which the product never mixes. With ``radius`` (the matrix is zero beyond that distance
    from its diagonal), each block of output rows multiplies only the band of inputs it
    reaches (about half the work of the dense product once n exceeds four radii)."""
    import torch

    n = t.shape[axis]
    block = max(32, 2 * (radius or 0))
    blocks = [(0, n, 0, n)]
    if radius is not None and block + 2 * radius < n:
        blocks = [
            (a, min(a + block, n), max(0, a - radius), min(n, a + block + radius))
            for a in range(0, n, block)
        ]
    lead = int(np.prod(t.shape[:axis], dtype=np.int64))
    view = t.view(lead, n, -1)
    trail = view.shape[2]

    def product(part, last: bool):
        if len(blocks) == 1:
            return part @ matrix.T if last else matrix @ part
        out = torch.empty_like(part)
        for a, b, c0, c1 in blocks:
            if last:
                out[..., a:b] = part[..., c0:c1] @ matrix[a:b, c0:c1].T
            else:
                out[..., a:b, :] = matrix[a:b, c0:c1] @ part[..., c0:c1, :]
        return out

    if lead == 1:  # the first axis: one product per block of columns
        flat = view[0]
        step = max(1, CHUNK_VOXELS // n)
        for start in range(0, trail, step):
            part = flat[:, start : start + step]
            part.copy_(product(part, last=False))
        return
    step = max(1, CHUNK_VOXELS // (n * trail))
    for start in range(0, lead, step):
        part = view[start : start + step]
        if trail == 1:  # the last axis: rows times the matrix's transpose
            rows = part[..., 0]
            rows.copy_(product(rows, last=True))
        else:
            part.copy_(product(part, last=False))


def finish(
    values: np.ndarray,
    foreground: np.ndarray | None,
    scan_normalise: bool,
    stats: tuple[float, float] | None = None,
) -> np.ndarray:
    """The last steps on a (smoothed) weighted sum: per-scan robust z-scores when asked (only
    "higher than this scan's median" counts: negative values become 0), then zero outside the
    foreground when one is given, in place (``values`` is a new weighted sum). ``stats``
    (median, spread) replaces the statistics of ``values`` itself (for a slice of a volume)."""
    out = values
    if scan_normalise:
        out = robust_z(out, foreground, stats, out=out if out.dtype == np.float32 else None)
        np.maximum(out, 0, out=out)
    if foreground is not None:  # a product: far faster than assigning through ~foreground
        np.multiply(out, foreground, out=out)
    return out


#: at most this many voxels, evenly strided, set a scan's median and spread
ROBUST_SAMPLE = 2_000_000
#: about this many voxels set the median and spread of a one-slice preview
PREVIEW_SAMPLE = 200_000
#: at most about this many voxels estimate them when a weighted map is not made yet
COARSE_VOXELS = 2_000_000


def robust_stats(values: np.ndarray, where: np.ndarray | None = None) -> tuple[float, float]:
    """(median, 1.4826 MAD) of ``values[where]`` (all values when ``where`` is None or empty;
    at most 2 million of them, evenly strided)."""
    ref = values[where] if where is not None and where.any() else values.ravel()
    ref = ref[:: max(1, ref.size // ROBUST_SAMPLE)]
    med = float(np.median(ref))
    mad = 1.4826 * float(np.median(np.abs(ref - med)))
    return med, mad


def robust_z(
    values: np.ndarray,
    where: np.ndarray | None = None,
    stats: tuple[float, float] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``(values - median) / (1.4826 * MAD)`` with median and MAD over ``values[where]``
    (:func:`robust_stats`), or the given ``stats``; float32, into ``out`` when given (it may be
    ``values`` itself)."""
    med, mad = robust_stats(values, where) if stats is None else stats
    out = np.subtract(values, np.float32(med), out=out, dtype=np.float32)
    out *= np.float32(1.0 / (mad if mad > 0 else 1.0))
    return out


def min_voxels(min_size_mm3: float, spacing: tuple[float, ...], ndim: int) -> int:
    """The smallest component (voxels) a minimum size of ``min_size_mm3`` keeps."""
    if min_size_mm3 <= 0:
        return 0
    voxel = float(np.prod(spacing[:ndim]))
    return int(np.ceil(min_size_mm3 / voxel))


def label_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a boolean mask (fully connected: 26 neighbours in 3D) and the
    size of each (``sizes[0]`` is the background's)."""
    from scipy.ndimage import generate_binary_structure, label

    structure = generate_binary_structure(mask.ndim, mask.ndim)
    try:  # labelled as uint16 at once (half of int32's memory); too many parts need int32
        labels, n = label(mask, structure=structure, output=np.uint16)
    except RuntimeError:
        labels, n = label(mask, structure=structure)
    if n < 255:
        labels = labels.astype(np.uint8)
    flat = labels.reshape(-1)
    sizes = np.zeros(n + 1, np.int64)
    for start in range(0, flat.size, CHUNK_VOXELS):  # bincount copies its input as int64
        sizes += np.bincount(flat[start : start + CHUNK_VOXELS], minlength=n + 1)
    return labels, sizes


def _keep_table(sizes: np.ndarray, n: int) -> np.ndarray:
    keep = (sizes >= n).astype(np.uint8)
    keep[0] = 0
    return keep


def keep_large(labels: np.ndarray, sizes: np.ndarray, n: int) -> np.ndarray:
    """uint8 mask of the components (:func:`label_components`) of at least ``n`` voxels.

    Looked up in chunks of :data:`CHUNK_VOXELS`: a lookup holds the interpreter for its whole
    length, and a viewer thread waits meanwhile (0.3 s at once on 144 million voxels)."""
    keep = _keep_table(sizes, n)
    flat = labels.reshape(-1)
    out = host_array(labels.shape, np.uint8)
    dest = out.reshape(-1)
    for start in range(0, flat.size, CHUNK_VOXELS):
        np.take(keep, flat[start : start + CHUNK_VOXELS], out=dest[start : start + CHUNK_VOXELS])
    return out


def _slabs(shape: tuple[int, ...]) -> Iterator[slice]:
    """Slices along the first axis of about :data:`CHUNK_VOXELS` voxels each (at least one
    plane), so that a whole-volume step makes no full-size temporary whatever the memory
    order."""
    step = max(1, CHUNK_VOXELS // max(1, int(np.prod(shape[1:]))))
    for start in range(0, shape[0], step):
        yield slice(start, start + step)


def component_peaks(values: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """float32 per component (``count`` entries; 0 for the background): the largest value of
    ``values`` in it. Both arrays share a shape and are read in slabs along the first axis,
    so neither is copied whole whatever its memory order."""
    peaks = np.zeros(count, np.float32)
    for part in _slabs(values.shape):
        lab = labels[part]
        inside = lab > 0
        np.maximum.at(peaks, lab[inside], values[part][inside])
    peaks[0] = 0.0
    return peaks


def outline_tables(
    peaks: np.ndarray,
    sizes: np.ndarray,
    n: int,
    threshold: float,
    grow: float,
    fraction: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per component of the map above ``grow``: uint8 whether it is kept (its peak above
    ``threshold``, at least ``n`` voxels) and the float32 level its outline lies at,
    ``max(grow, fraction * peak)`` (step 5 of the module doc)."""
    keep = _keep_table(sizes, n) & (peaks > np.float32(threshold)).astype(np.uint8)
    level = np.maximum(np.float32(grow), np.float32(fraction) * peaks).astype(np.float32)
    return keep, level


def outline_mask(
    values: np.ndarray, labels: np.ndarray, keep: np.ndarray, level: np.ndarray
) -> np.ndarray:
    """uint8 mask: voxels of kept components at or above their component's level
    (:func:`outline_tables`); computed in slabs along the first axis."""
    out = host_array(labels.shape, np.uint8)
    for part in _slabs(values.shape):
        lab = labels[part]
        inside = keep[lab].astype(bool)
        inside &= values[part] >= level[lab]
        out[part] = inside
    return out


def outline_slice(
    values: np.ndarray,
    threshold: float,
    grow: float,
    fraction: float,
    sharp: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 outlined mask of one slice computed within the slice alone (parts seeded on other
    slices are missing, and a part's peak is its peak in this slice: an approximation, for
    previews); with ``sharp`` (the same slice of the map parts are outlined on) each part is
    outlined there at ``fraction`` of its peak."""
    labels, sizes = label_components(above(values, grow))
    peaks = component_peaks(values, labels, len(sizes))
    keep, level = outline_tables(peaks, sizes, 0, threshold, grow, fraction)
    if sharp is None:
        return outline_mask(values, labels, keep, level)
    level = fraction_levels(component_peaks(sharp, labels, len(sizes)), fraction)
    return outline_mask(sharp, labels, keep, level)


def select_parts(marked: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """uint8 mask: the voxels of ``marked`` that lie in kept components (``keep``, uint8 per
    label of ``labels``); computed in slabs along the first axis."""
    out = host_array(labels.shape, np.uint8)
    for part in _slabs(labels.shape):
        out[part] = marked[part] & keep[labels[part]]
    return out


def drop_loose_pieces(mask: np.ndarray, n: int) -> np.ndarray:
    """``mask`` (uint8 or bool, changed in place and returned) without its connected pieces
    (26 neighbours) of fewer than ``n`` voxels; labelled within the box that holds its marked
    voxels, so a small mask in a large volume costs little."""
    if n <= 1 or not mask.any():
        return mask
    from .preprocess import bounding_box

    box = bounding_box(mask)
    labels, sizes = label_components(mask[box] > 0)
    small = sizes < n
    small[0] = False
    if small.any():
        mask[box][small[labels]] = 0
    return mask


def fraction_levels(peaks: np.ndarray, fraction: float) -> np.ndarray:
    """float32 per component: ``fraction`` of its peak on the map it is outlined on, when that
    is a sharper map than the one that found it (step 5 of the module doc)."""
    return (np.float32(fraction) * peaks).astype(np.float32)


def sharper_map(smoothing_mm: float) -> str:
    """How the fronts name the map a mask's parts are outlined on (``outline_smoothing_mm``):
    "the unsmoothed map", or "the map smoothed 2 mm"."""
    return "the unsmoothed map" if smoothing_mm == 0 else f"the map smoothed {smoothing_mm:g} mm"


def above(values: np.ndarray, threshold: float) -> np.ndarray:
    """bool ``values > threshold``, the threshold taken in at least float32: NumPy would round
    it to a float16 map's own precision (a Python float adapts to the array), which moves the
    threshold by up to 2**-11 of itself."""
    return values > np.asarray(threshold, dtype=np.result_type(values.dtype, np.float32))


def plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A new C-contiguous copy of slice ``index`` along ``axis`` (what ``np.take`` returns,
    without its copy of the whole volume first when the volume is not C-contiguous, as the
    arrays SimpleITK gives back are: 0.13 s per slice at 600x600x400)."""
    key = [slice(None)] * volume.ndim
    key[axis] = index
    return np.array(volume[tuple(key)], order="C")


def threshold_mask(
    combined: np.ndarray,
    threshold: float,
    min_size_mm3: float = 0.0,
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """uint8 mask of voxels above ``threshold``, without connected components (26-connected)
    smaller than ``min_size_mm3``."""
    mask = above(combined, threshold)
    n = min_voxels(min_size_mm3, spacing, mask.ndim)
    if n > 1 and mask.any():
        return keep_large(*label_components(mask), n)
    return mask.astype(np.uint8)


def _stop_if(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        from .errors import Cancelled

        raise Cancelled("recombination cancelled")


#: lesions count as found from the smallest group of volume (octaves: 1-2 ml, 2-4 ml, ...) from
#: which every group had at least this share of its lesions marked (:func:`missed_lesions`)
FOUND_SHARE = 0.75
#: an octave with fewer lesions than this is judged together with the next larger one
FOUND_MIN_LESIONS = 3


@dataclass(frozen=True)
class MissedLesions:
    """What a default mask missed on lesions of known volume (:func:`missed_lesions`).

    Attributes:
        limit_ml: the smallest lesion volume (ml) of the smallest group from which every
            group had at least :data:`FOUND_SHARE` of its lesions marked; None when even the
            largest group did not.
        below, found_below: lesions under ``limit_ml`` (all of them when it is None) and how
            many of them the mask marked.
        above, found_above: the same for the lesions of ``limit_ml`` or more.
        smallest_ml, largest_ml: the range of volumes measured.
        smallest_found_ml: the smallest lesion the mask marked (None when it marked none).
    """

    limit_ml: float | None
    below: int
    found_below: int
    above: int
    found_above: int
    smallest_ml: float
    largest_ml: float
    smallest_found_ml: float | None = None

    def not_ruled_out(self) -> str:
        """What an empty mask does not rule out, e.g. "lesions under about 4 ml"."""
        if self.limit_ml is None:
            return "a lesion of any size measured"
        if self.below == 0:
            return f"lesions under {_ml_text(self.limit_ml)} ml, the smallest measured"
        return f"lesions under about {_ml_text(self.limit_ml)} ml"

    def marked(self) -> str:
        """What the mask marked, e.g. "marked 2 of 29 seeded lesions under about 4 ml, 29 of
        31 larger", or without a limit "marked 8 of 60 seeded lesions of 0.16-62 ml, none
        under 26 ml"."""
        if self.limit_ml is None or self.below == 0:
            n, found = self.below + self.above, self.found_below + self.found_above
            least = self.smallest_found_ml
            under = (
                f", none under {_ml_text(least)} ml"
                if self.limit_ml is None and least is not None and least > self.smallest_ml
                else ""
            )
            return (
                f"marked {found} of {n} seeded lesions of {_ml_text(self.smallest_ml)}-"
                f"{_ml_text(self.largest_ml)} ml{under}"
            )
        return (
            f"marked {self.found_below} of {self.below} seeded lesions under about "
            f"{_ml_text(self.limit_ml)} ml, {self.found_above} of {self.above} larger"
        )


def missed_lesions(lesions: list[list[float]]) -> MissedLesions:
    """The volume under which a mask misses lesions. ``lesions`` is one [volume in ml, 1 when
    the mask marked part of it else 0] per lesion (``Calibration.individual_lesions``). The
    lesions are grouped by octave of volume (2^k to 2^(k+1) ml), an octave with fewer than
    :data:`FOUND_MIN_LESIONS` lesions together with the next larger ones (the largest left
    over with the group below them); the limit is the smallest volume in the smallest group
    from which every group had at least :data:`FOUND_SHARE` of its lesions marked.

    Raises:
        ValueError: ``lesions`` is empty, or a volume is not > 0.
    """
    if not lesions:
        raise ValueError("no lesions measured")
    pairs = sorted((float(v), int(f)) for v, f in lesions)
    if pairs[0][0] <= 0:
        raise ValueError(f"a lesion volume must be > 0, not {pairs[0][0]}")
    groups: list[list[int]] = []  # indices into pairs, ascending
    current: list[int] = []
    for i, (v, _) in enumerate(pairs):
        current.append(i)
        octave = math.floor(math.log2(v))
        last_of_octave = i + 1 == len(pairs) or math.floor(math.log2(pairs[i + 1][0])) > octave
        if last_of_octave and len(current) >= FOUND_MIN_LESIONS:
            groups.append(current)
            current = []
    if current:  # the largest, too few for a group of their own
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    start = None  # the first lesion of the limiting group
    for group in reversed(groups):
        if sum(pairs[i][1] for i in group) < FOUND_SHARE * len(group):
            break
        start = group[0]
    found = [f for _, f in pairs]
    lo, hi = pairs[0][0], pairs[-1][0]
    least = next((v for v, f in pairs if f), None)
    if start is None:
        return MissedLesions(None, len(pairs), sum(found), 0, 0, lo, hi, least)
    below, above = sum(found[:start]), sum(found[start:])
    return MissedLesions(pairs[start][0], start, below, len(pairs) - start, above, lo, hi, least)


def _ml_text(ml: float) -> str:
    """A volume in ml to two significant digits at most (0.52, 4.3, 17)."""
    return f"{ml:.2g}" if ml < 10 else f"{ml:.0f}"
