"""The widget's state without any Qt: the cached result of one run and the cheap recomputation of
the combined map and the mask when a slider moves (cellpose-napari's "re-threshold" pattern).

The recomputation itself is the one post-processing pipeline every front uses
(:class:`~napari_vaeloc.combine.PostProcessor`); this module adds only what the panel shows:
contrast limits and the meaning of the threshold in words; and, for scan preparation, the
"prepare scan" choices, the fit line's words and the preparation's advice in the panel's terms
(:func:`in_panel_words`). The model a modality guess preselects is chosen by
:func:`napari_vaeloc.models.choice.choose_model`, as on the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .combine import PostProcessor
from .mapnames import SLIDER_MAPS

if TYPE_CHECKING:  # the engine pulls in torch: never at plugin import time
    from .engine import LocalizationResult
    from .models.card import ModelCard

#: every map in plain words: map name (files, ``mapnames``) -> (label in the panel, what it
#: shows and what its number means); docs/plugin.md maps them to the paper's terms
MAP_LABELS: dict[str, tuple[str, str]] = {
    "reconstruction": (
        "reconstruction",
        "the model's healthy-looking redraw of each slice, in the scan's own intensity units",
    ),
    "rec_error": (
        "reconstruction error",
        "how badly the redraw matches the scan at each voxel (negative log-likelihood, nats): "
        "high where the scan looks unlike healthy brain, also at edges",
    ),
    "rec_error_smooth": (
        "reconstruction error (smoothed)",
        "the reconstruction error smoothed over a few voxels: fewer isolated bright voxels",
    ),
    "sq_error": ("squared error", "squared difference between the scan and its redraw"),
    "kl_grad": (
        "KL gradient",
        "how strongly each voxel pushes the slice's code away from healthy anatomy (size of "
        "the gradient of the KL term): smooth, less sensitive to edges",
    ),
    "rec_grad": (
        "reconstruction-error gradient",
        "how strongly each voxel changes the reconstruction error (size of its gradient)",
    ),
    "elbo_grad": (
        "whole-loss gradient",
        "how strongly each voxel changes the model's whole loss, reconstruction error plus KL "
        "term (size of the gradient)",
    ),
    "combi": (
        "error × KL gradient",
        "the reconstruction error multiplied by the scaled KL gradient: high only where both "
        "are high",
    ),
    "kl_grad_sg": ("KL gradient (averaged over noisy copies)", "the KL gradient, SmoothGrad"),
    "elbo_grad_sg": (
        "whole-loss gradient (averaged over noisy copies)",
        "the whole-loss gradient, SmoothGrad",
    ),
    "restoration": (
        "difference to a healthy version",
        "how far a few gradient steps on the model's whole loss move each voxel towards "
        "healthy-looking anatomy",
    ),
}
#: result layers besides the combined map and the mask: layer suffix -> map name
MAP_LAYERS = {MAP_LABELS[k][0]: k for k in ("reconstruction", "rec_error", "kl_grad")}

#: above this many voxels the panel keeps its maps, and their smoothed components, as float16
#: (a 1 mm head has 8.5 million; at 600x600x400, 144 million, seven float32 maps would take
#: 4 GiB). Their relative rounding, 2**-11, is far below what a slider or the eye resolves.
PANEL_FLOAT16_VOXELS = 1 << 25


def panel_map_dtype(shape: tuple[int, ...]) -> str:
    """The precision of the maps the panel keeps for a scan of ``shape``: "float32", or
    "float16" above :data:`PANEL_FLOAT16_VOXELS` voxels."""
    return "float16" if int(np.prod(shape, dtype=np.int64)) > PANEL_FLOAT16_VOXELS else "float32"


def panel_maps(card: ModelCard) -> tuple[str, ...]:
    """The maps a run of the panel computes and keeps: of the maps a localization computes by
    default for ``card`` (:func:`~napari_vaeloc.engine.maps_for`), those a weight slider, a
    result layer or the card's default combination uses; the others (``sq_error``,
    ``rec_grad``) would only take memory and time (``vaeloc localize`` writes them)."""
    from .engine import maps_for

    used = {*SLIDER_MAPS, *MAP_LAYERS.values(), *(card.defaults.weights or {})}
    return tuple(k for k in maps_for(card) if k in used)


#: how each result layer is shown when it is added: role -> napari layer options; the map
#: layers' roles are their map names (their contrast limits come with the result)
LAYER_STYLES: dict[str, dict] = {
    "reconstruction": {"colormap": "gray", "visible": False},
    "rec_error": {"colormap": "magma", "visible": False, "blending": "additive"},
    "kl_grad": {"colormap": "viridis", "visible": False, "blending": "additive"},
    "combined": {"colormap": "inferno", "blending": "additive"},
    "mask": {"opacity": 0.6},
}

#: the other result layers: layer suffix -> what it shows
RESULT_LAYERS = {
    "anomaly map": "the combined anomaly map that is thresholded: the weighted sum of the maps, "
    "each divided by its healthy 99th percentile (1 = as unusual as the top 1 % of healthy "
    "brain voxels)",
    "mask": "voxels of the anomaly map above the threshold, without parts smaller than the "
    "minimum size",
    "brain mask": "the brain that was scored (after brain extraction or registration)",
    "corrected brain": "the scan after bias-field correction, 0 outside the brain mask",
}

FIT_TOOLTIP = "how the scan fits the model, after a run (hover for every check)"
#: what each control does and what its number means (shown on hover)
TOOLTIPS = {
    "image": "the scan to search for anomalies: a grayscale 2D, 3D or 4D Image layer (layers "
    "this panel made are not offered)",
    "volume": "which volume of a 4D scan to localize (0 = the first); starts at the volume the "
    "viewer shows",
    "model": "the trained model that scores the scan; it should have learned the scan's "
    "modality (T1 or T2). 'load from folder…' adds a model folder made by 'vaeloc train'",
    "model_info": "the model's modality, slicing direction and calibration, and which "
    "modality the selected scan looks like",
    "device": "where the model runs: auto picks a CUDA GPU, then Apple MPS, then the CPU",
    "axis": 'the direction the scan is cut into 2D slices for the model; "model\'s axis" '
    "uses the one it was trained on",
    "run": "score the scan with the model in the background and add the result layers "
    "(reconstruction, reconstruction error, KL gradient, anomaly map, mask)",
    "cancel": "stop the running localization; no layers are added or changed",
    "progress": "what the panel is doing: the preparation stage, then slices scored out of "
    "all, or the files being exported",
    "result": "the scan and model the shown result layers, sliders and export belong to",
    "smoothing": "extra 3D Gaussian smoothing of the anomaly map, σ in mm (0 = none); larger "
    "values suit larger lesions",
    "scan_normalise": "express the combined map relative to this scan's own median and "
    "spread, so that a scan explained worse overall does not light up everywhere; the "
    "threshold is then in robust z-units",
    "threshold": "voxels of the anomaly map above this value form the mask; the line below "
    "says what the value means (a healthy false-positive rate when the model is calibrated)",
    "threshold_info": "what the threshold means for this model and these settings",
    "outline": "a part of the mask is found where the anomaly map passes the threshold, and "
    "reaches out to where the map falls to a fraction of its peak (0.4 for the bundled T2 "
    "model, not below the model's grow level; t1-brain draws the edge on the unsmoothed map, "
    "at 0.3 of the part's peak there): the edge of a smoothed lesion; off, the mask is the "
    "voxels above the threshold only, often just a lesion's core",
    "min_size": "parts of the mask smaller than this volume (mm³) are dropped; 0 keeps all",
    "defaults": "set weights, smoothing, normalisation, threshold and minimum size to the "
    "values stored with the model",
    "paper": "the method as published (Zimmerer et al., MICCAI 2019): the error x KL gradient "
    "map alone, no 3D smoothing or per-scan normalisation, threshold at the top 1 % of healthy "
    "brain voxels",
    "export_maps": "also save every map, the anomaly map and a JSON of scores next to the mask "
    "(the files 'vaeloc localize' writes)",
    "export": "save the mask of the result named under 'result' as NIfTI in the scan's own "
    "geometry; asks before replacing files",
}


def weight_tooltip(name: str) -> str:
    """The tooltip of the weight slider of map ``name``: what the map shows and what a weight
    of 1 adds to the combined map."""
    label, what = MAP_LABELS[name]
    return (
        f"weight of the {label} in the combined anomaly map ({what}). The map is divided by "
        "its healthy 99th percentile first, so a weight of 1 adds 1 where a voxel is as "
        "unusual as the top 1 % of healthy brain voxels; 0 leaves the map out"
    )


def layer_help(base: str) -> str:
    """Every result layer of the scan ``base`` and what it shows, one a line."""
    parts = {**{s: MAP_LABELS[k][1] for s, k in MAP_LAYERS.items()}, **RESULT_LAYERS}
    return "\n".join(f"{base} {suffix}: {what}" for suffix, what in parts.items())


class Session(PostProcessor):
    """One finished run: its result (with the scan and the model's card) and the current
    settings. Nothing here ever runs the network.

    The scales of every slider component and the contrast limits of the map layers are
    computed on creation (in the worker thread), so that the GUI thread never goes over the
    whole volume for them. So are the maps of the starting weights, when the engine deferred
    them; the others stay deferred until a weight slider uses them (the background
    recombination makes them) or their map layer is shown (the panel makes it in a worker).
    """

    def __init__(self, result: LocalizationResult) -> None:
        super().__init__(result)
        for name in self.settings.used_weights():
            if name in result.maps:
                result.maps[name]  # made now, in the worker
        self._ranges: dict[str, tuple[float, float]] = {}
        for name in sorted(set(SLIDER_MAPS) | set(self.settings.weights)):
            if name in result.maps:
                self.scale(name)
        for name in MAP_LAYERS.values():
            if name in result.maps:
                self.map_range(name)

    @property
    def volume(self):
        return self.result.volume

    def display_range(self) -> tuple[float, float]:
        """Fixed contrast limits of the combined map, in scale units (never per-volume min-max):
        from 0.8 of the summed weights (just below the healthy 99th percentile, so healthy brain
        stays dark) to twice it; with per-scan normalisation, 2 to 8 robust z-units."""
        if self.settings.scan_normalise:
            return (2.0, 8.0)
        total = sum(abs(w) for w in self.settings.weights.values()) or 1.0
        return (0.8 * total, 2.0 * total)

    def map_range(self, name: str) -> tuple[float, float]:
        """Contrast limits of a component map: 0 to twice its (calibrated) scale; for the
        reconstruction, the scan's minimum to its 99.5th percentile."""
        if name not in self._ranges:
            if name == "reconstruction":
                data = self.volume.data
                top = float(np.percentile(data[::2, ::2, ::2], 99.5))
                self._ranges[name] = (float(data.min()), top)
            else:
                self._ranges[name] = (0.0, 2.0 * self.scale(name)[0])
        return self._ranges[name]

    def threshold_text(self) -> str:
        """What the current threshold means, in calibrated terms when it can."""
        t = self.settings.threshold
        if not self.is_calibrated():
            return f"{t:.2f} × this scan's own 99th percentile (uncalibrated model)"
        pairs = self.fpr_table()
        if pairs:
            if t > pairs[-1][0]:
                text = f"healthy false-positive rate < {pairs[-1][1]:.2%}"
            elif t < pairs[0][0]:
                text = f"healthy false-positive rate > {pairs[0][1]:.0%}"
            else:
                fpr = self.fpr_for_threshold(t)
                text = f"healthy false-positive rate ≈ {fpr:.3g} ({fpr:.2%} of healthy voxels)"
            source = self.levels_source()
            if source is not None:
                text += f" ({source})"
            if self.rates_approximate():
                from .engine import APPROXIMATE_RATES

                text += f"; {APPROXIMATE_RATES}"
            if self.settings.outline_dropped():
                text += (
                    f"; at or below the outline's grow level ({self.settings.grow_threshold:.2f}): "
                    "the mask is the voxels above the threshold"
                )
            if self.settings.grow_level() is not None:
                mask_fpr = self.mask_fpr()
                text += (
                    f"; the outlined mask marks {mask_fpr:.2%} of healthy voxels"
                    if mask_fpr is not None
                    else "; each part outlined at a fraction of its peak: the threshold picks "
                    "the parts, not their size (the mask's rate is measured at the default only)"
                )
            return text
        if self.settings.is_paper():
            return (
                f"{t:.2f} × healthy 99th percentile of Combi: the paper's threshold, "
                "1 % of validation pixels"
            )
        beyond = self.uncalibrated_smoothing()
        if beyond is not None:
            units = "robust z-units" if self.settings.scan_normalise else "× healthy 99th pct."
            return f"{t:.2f} {units} ({beyond}: no FPR calibration here)"
        if self.settings.scan_normalise:
            return f"{t:.2f} robust z-units above this scan's median (no FPR calibration)"
        return f"{t:.2f} × healthy 99th percentile (custom weights: no FPR calibration)"


# -- preparation: the "prepare scan" choice, the fit line, the modality guess --------------------
#: the "prepare scan" choices: (shown text, mode passed to the engine)
PREPARE_CHOICES = [("auto", "auto"), ("full", "full"), ("none", "none")]
PREPARE_TOOLTIP = (
    "how the scan is brought into the model's template space before scoring:\n"
    "auto: bias-field correction, brain extraction only when a skull is detected, "
    "registration only when the scan is not on the template's grid;\n"
    "full: every step, whatever the scan looks like;\n"
    "none: score the scan as given (it must already be a skull-stripped brain in the "
    "model's template space, like the bundled MNI samples)"
)
#: preparation steps after which the brain mask and the prepared brain are worth showing
#: (without them the mask is the scan's own non-zero voxels)
GEOMETRY_STEPS = ("brain extraction", "registration")


def prepare_mode_for(mode: str, shape: tuple[int, ...]) -> tuple[str, str]:
    """The preparation mode a run of a scan of ``shape`` uses, and a note when it differs.

    A single slice (or a slab too thin to register, :func:`~napari_vaeloc.prepare.too_thin`)
    cannot be registered to a 3D template: "auto" scores it as given (the note says so);
    "full" is refused with :class:`~napari_vaeloc.errors.InputError`, before the worker starts.
    """
    from .prepare import too_thin

    if not too_thin(shape) or mode == "none":
        return mode, ""
    if mode == "full":
        from .errors import InputError

        raise InputError(
            "a single slice cannot be prepared (registration needs a 3D scan); choose "
            "'prepare scan: none' to score it as given, or open the whole volume"
        )
    return "none", "single slice: scored as given (preparation needs a 3D scan)"


def offers_preparation_layers(result: LocalizationResult) -> bool:
    """True when the run extracted the brain or registered the scan, so that its brain mask and
    bias-corrected brain add something to the scan itself."""
    report = result.preparation
    return report is not None and any(s.ran and s.name in GEOMETRY_STEPS for s in report.steps)


def fit_text(result: LocalizationResult, mode: str, note: str = "") -> tuple[str, str]:
    """The fit line after a run and its level ("ok", "warn" or "none" when nothing was checked):
    "scan fits the model: ..." with the modality, the registration Dice and the coverage, or the
    warnings of the checks that did not pass."""
    report = result.preparation
    if report is None:
        if note:
            return note, "warn"
        from .engine import UNPREPARED_NOTE

        unprepared = [n for n in result.notes if n.endswith(UNPREPARED_NOTE)]
        if unprepared:  # scored as given where preparation was wanted: the note says why
            return unprepared[0], "warn"
        if mode == "none":
            return (
                "scored as given (prepare scan: none): the scan must already be a "
                "skull-stripped brain in the model's template space",
                "none",
            )
        return "scored as given: no preparation ran", "warn"
    numbers = []
    modality = report.check("modality")
    if modality is not None:
        numbers.append(str(modality.message))
    registration = report.check("registration")
    if registration is not None and isinstance(registration.value, int | float):
        numbers.append(f"registration Dice {registration.value:.2f}")
    coverage = report.check("coverage")
    if coverage is not None and isinstance(coverage.value, int | float):
        numbers.append(f"coverage {coverage.value:.0%}")
    ran = [s.name for s in report.steps if s.ran and s.name != "checks"]
    steps = f" [{', '.join(ran)}]" if ran else ""
    warnings = list(report.warnings)
    from .engine import MISSING_NOTE_ML

    if result.missing_ml >= MISSING_NOTE_ML:  # as the engine's note on the gap
        warnings.append(f"{result.missing_ml:.3g} ml of the brain without data in the file "
                        "(left out)")  # fmt: skip
    if warnings:
        return (
            "scan fits the model with warnings: " + "; ".join(warnings)
            + (f" ({', '.join(numbers)})" if numbers else "") + steps,
            "warn",
        )  # fmt: skip
    return "scan fits the model: " + ", ".join(numbers) + steps, "ok"


def fit_tooltip(result: LocalizationResult) -> str:
    """Every preparation step and check, one a line, with the advice of checks that did not
    pass (the fit line's tooltip)."""
    report = result.preparation
    if report is None:
        return "\n".join(result.notes)
    lines = report.lines()
    for c in report.checks:
        if c.level != "ok" and c.advice:
            lines.append(f"advice ({c.name}): {c.advice}")
    return "\n".join(lines)


#: the preparation's advice, and the panel's controls that do what it says (the command line
#: names its options instead)
PANEL_WORDS = {
    "force brain extraction on or off": "force brain extraction on with 'prepare scan: full', "
    "or score the scan as given with 'prepare scan: none'",
}


def in_panel_words(message: str) -> str:
    """``message`` (a refusal's advice) with the preparation's advice naming the panel's
    controls."""
    for words, here in PANEL_WORDS.items():
        if here not in message:
            message = message.replace(words, here)
    return message
