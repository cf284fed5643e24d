"""The sliders of the "Localize anomalies" panel and the result layers they update.

A finished run leaves a :class:`~napari_vaeloc._widget_controller.Session` (the cached maps and
their cached, smoothed, scaled components). A slider move never waits for the whole volume:

1. at once, in the GUI thread, the slice the viewer shows is recomputed from the cached
   components (:meth:`~napari_vaeloc.combine.PostProcessor.slice_preview`, a few milliseconds)
   and written into the shown layers;
2. after a short debounce, a worker thread recombines the whole volume (first the shown slice,
   when step 1 could not: a new smoothing is smoothed on the slab of slices that reach it) and
   the layers take the result. A new move cancels stale work: a worker still running is asked
   to stop between components, its result is dropped, and only the newest settings are
   computed next.

Both steps go through the one post-processing pipeline of :mod:`napari_vaeloc.combine`, so the
whole volume the layers end with is what the command line computes for the same settings.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer

from ._widget_controller import LAYER_STYLES, MAP_LAYERS
from ._widget_layers import PendingMap, file_axis, put_layer
from ._widget_run import live, start_worker
from .combine import at_smoothing

#: how long the sliders wait for the next move before recombining the whole volume (ms)
DEBOUNCE_MS = 50


@dataclass
class Recombination:
    """One background recombination: the settings it computes, the slice to show first (file
    axis, index; None: none), and its cancel flag."""

    generation: int
    settings: Any
    where: tuple[int, int] | None
    previewed: bool
    cancel: threading.Event = field(default_factory=threading.Event)


def recombine(session: Any, job: Recombination) -> Any:
    """The worker's generator: the shown slice first (when the GUI thread could not preview
    it), then the whole combined map and mask; ``Cancelled`` when a newer move came."""
    if job.where is not None and not job.previewed:
        preview = session.slice_preview(job.settings, *job.where, compute=True)
        if preview is not None and not job.cancel.is_set():
            yield preview
    combined = session.combined(job.settings, job.cancel.is_set)
    mask = session.mask(job.settings, job.cancel.is_set)
    session.cut_note(mask)  # kept for the GUI thread's mask line
    return combined, mask


def _layer_data(maps: Any, name: str) -> Any:
    """A map layer's data: the map when it is made, else a :class:`PendingMap` (made when the
    layer is shown)."""
    if maps.is_deferred(name):
        shape, dtype = maps.describe(name)
        if shape is not None and dtype is not None:
            return PendingMap(maps, name, shape, dtype)
    return maps[name]


def _kept(shown: float, setting: float) -> float:
    """``setting`` when a slider showing ``shown`` shows it (to the slider's precision, about
    six digits), else ``shown``."""
    return setting if abs(shown - setting) <= 1e-5 * max(1.0, abs(setting)) else shown


class TuningMixin:
    """The tuning part of :class:`~napari_vaeloc._widget.LocalizeWidget`: the map layers, the
    combined map and mask, the sliders and the model's defaults. It uses the panel's controls
    and state (``weights``, ``threshold``, ``session``, ``_timer``, ...)."""

    def _init_tuning(self) -> None:
        """The shown result's state and the sliders' debounce timer (before the panel is laid
        out)."""
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._on_timer)
        self._quiet = False  # set while the panel itself moves the sliders
        self._input_layer: Any = None  # the scan of the shown result
        self._watched: weakref.WeakSet = weakref.WeakSet()  # map layers whose showing we follow
        self._making: set[PendingMap] = set()  # map layers' maps being made in a worker
        self._base = ""  # the shown result's layer-name prefix
        self._mask_line = ""  # the threshold panel's line on the shown mask
        self._result_model = ""  # the model (its name in the list) of the shown result
        self._shape: tuple[int, ...] = ()
        self._last_run_model: Any = None
        #: the arrays the combined-map and mask layers show (the session's, before a preview
        #: writes into them)
        self._shown: dict[str, np.ndarray] = {}
        self._generation = 0  # bumped by every change of the shown settings
        self._previewed = -1  # the generation whose shown slice the GUI thread previewed
        self._recombination: Recombination | None = None  # the one running
        self._recombine_worker: Any = None
        self._next: Recombination | None = None  # waits for the running one to stop
        self._when_whole: Any = None  # called once the whole volume is shown (ends a run)

    @property
    def updating(self) -> bool:
        """True while the layers do not yet show the whole volume under the current settings
        (a recombination is pending or running)."""
        return self._timer.isActive() or self._recombine_worker is not None

    def _names(self) -> dict[str, str]:
        """The shown result's layer names: layer suffix or role -> name."""
        base = self._base
        return {
            **{suffix: f"{base} {suffix}" for suffix in MAP_LAYERS},
            "combined": f"{base} anomaly map",
            "mask": f"{base} anomaly mask",
        }

    def _update_maps(self) -> Iterator[None]:
        """Put the session's map layers (a generator: it yields after each layer)."""
        s, names = self.session, self._names()
        assert s is not None
        for key, slider in self.weights.items():  # a map the run did not compute has no say
            slider.enabled = key in s.result.maps
        for suffix, key in MAP_LAYERS.items():
            layer = put_layer(
                self.viewer, "image", names[suffix], _layer_data(s.result.maps, key).reshape(
                    self._shape), self._input_layer, suffix, contrast_limits=s.map_range(key),
                **LAYER_STYLES[key],
            )  # fmt: skip
            if layer is not None and layer not in self._watched:
                self._watched.add(layer)
                layer.events.visible.connect(self._on_map_layer_visible)
            self._make_if_shown(layer)
            yield

    @live
    def _on_map_layer_visible(self, event: Any) -> None:
        self._make_if_shown(event.source)

    def _make_if_shown(self, layer: Any) -> None:
        """A shown map layer whose map is not made yet gets it from a worker."""
        from napari.qt.threading import create_worker

        pending = getattr(layer, "data", None)
        if not isinstance(pending, PendingMap) or not layer.visible or pending in self._making:
            return
        self._making.add(pending)
        worker = create_worker(
            pending.make, _start_thread=False,
            _connect={"returned": lambda made: self._on_map_made(layer, pending, made),
                      "errored": lambda exc: self._on_map_failed(layer, exc),
                      "finished": lambda: self._making.discard(pending)},
        )  # fmt: skip
        start_worker(worker)

    @live
    def _on_map_failed(self, layer: Any, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        text = " ".join(str(exc).split()) or type(exc).__name__
        show_error(f"could not show {getattr(layer, 'name', 'the map')}: {text}")

    @live
    def _on_map_made(self, layer: Any, pending: PendingMap, made: np.ndarray) -> None:
        if layer in self.viewer.layers and layer.data is pending:
            layer.data = made

    def _show_first(self) -> Iterator[None]:
        """Of a new session whose combination is cached, show the combined map, then the mask
        (a generator: it yields after each)."""
        s = self.session
        cached = s.cached() if s is not None else None
        if cached is not None:
            self._show_combined(cached.combined)
            yield
            self._show_mask(cached.mask)
            yield

    @live
    def _on_timer(self) -> None:
        self._recombine_in_background()

    def apply_settings(self) -> None:
        """Recompute the combined map and the mask of the whole volume from the cached maps, in
        this thread, and update the layers (background work for older settings is dropped)."""
        s = self.session
        if s is None or self.closed:
            return
        self._timer.stop()
        self._generation += 1
        self._show_whole(s.combined(), s.mask())
        self._whole_shown()

    def _show_whole(self, combined: np.ndarray, mask: np.ndarray) -> None:
        """Show a whole combined map and mask of the session's current settings (the combined
        map only when it changed: a threshold move must not re-upload the whole volume)."""
        s = self.session
        assert s is not None
        self._show_combined(combined)
        self._show_mask(mask)
        ml = s.mask_volume_ml(mask)
        hint = (
            s.small_lesion_hint("the smoothing slider at {mm} mm") if ml == 0 else s.cut_note(mask)
        )
        size = "empty" if ml == 0 else f"{ml:.1f} ml"  # as the command line says it
        self._mask_line = size + (f" ({hint})" if hint else "")
        self._show_threshold_info()

    def _show_threshold_info(self, mask_line: str | None = None) -> None:
        """What the threshold means, and a line on the shown mask (``mask_line``, else the
        last whole mask's); the line names the scan whenever the image box has moved on to
        another layer, and the model whenever the model box has moved on to another, since
        the sliders still tune that scan's result of that model."""
        s = self.session
        if s is None:
            return
        if mask_line is not None:
            self._mask_line = mask_line
        other_scan = self._input_layer is not None and self.image.value is not self._input_layer
        other_model = bool(self._result_model) and self.model.value != self._result_model
        head = "mask"
        if other_scan or other_model:
            head = f"mask of {self._base}" + (f" ({self._result_model})" if other_model else "")
        self.threshold_info.value = f"{s.threshold_text()}\n{head}: {self._mask_line}"

    def _show_combined(self, combined: np.ndarray) -> None:
        """Put ``combined`` into the anomaly-map layer unless it shows it already."""
        s, name = self.session, self._names()["combined"]
        assert s is not None
        if combined is not self._shown.get("combined") or name not in self.viewer.layers:
            put_layer(
                self.viewer, "image", name, combined.reshape(self._shape), self._input_layer,
                "combined", contrast_limits=s.display_range(), **LAYER_STYLES["combined"],
            )  # fmt: skip
            self._shown["combined"] = combined

    def _show_mask(self, mask: np.ndarray) -> None:
        """Put ``mask`` into the mask layer unless it shows it already."""
        name = self._names()["mask"]
        if mask is not self._shown.get("mask") or name not in self.viewer.layers:
            put_layer(
                self.viewer, "labels", name, mask.reshape(self._shape), self._input_layer,
                "mask", **LAYER_STYLES["mask"],
            )  # fmt: skip
            self._shown["mask"] = mask

    def _whole_shown(self) -> None:
        done, self._when_whole = self._when_whole, None
        if done is not None:
            done()

    def _show_result(self) -> bool:
        """Show a new session's combination: at once when the run's worker computed it for the
        current settings (or, on a small scan, computing it here), else the rest in the
        background."""
        s = self.session
        assert s is not None
        self._generation += 1
        cached = s.cached()
        if cached is not None:
            self._show_whole(cached.combined, cached.mask)
        elif not self._large():
            self._show_whole(s.combined(), s.mask())
        else:
            self._timer.stop()
            self._recombine_in_background()
            return False
        return True

    def _large(self) -> bool:
        """Whether whole-volume work on this result takes long enough to belong in a worker
        (above about a million voxels)."""
        return int(np.prod(self._shape or (0,))) > 1_000_000

    # ---------------------------------------------------------------- one slice first
    def displayed_slice(self) -> tuple[int, int] | None:
        """The slice of the result the viewer shows: (axis, index) on the scan's voxel grid (the
        order :func:`~napari_vaeloc._widget_layers.scan_inputs` gives), or None when the
        viewer shows the whole volume (3D view) or the result is not a 3D volume."""
        names = self._names()
        if len(self._shape) != 3 or names["combined"] not in self.viewer.layers:
            return None
        dims = self.viewer.dims
        layer = self.viewer.layers[names["combined"]]
        if dims.ndisplay != 2:
            return None
        lead = dims.ndim - layer.ndim
        hidden = [a - lead for a in dims.not_displayed if a >= lead]
        if len(hidden) != 1:
            return None
        j = hidden[0]
        try:
            position = layer.world_to_data(dims.point)
        except Exception:  # an unusual transform: no preview, the worker shows it all
            return None
        size = layer.data.shape[j]
        index = int(min(max(round(float(position[j])), 0), size - 1))
        return file_axis(self._input_layer, j, self._shape), index

    def _preview(self, where: tuple[int, int] | None, compute: bool = False) -> bool:
        """Write the shown slice of the current settings into the shown layers (GUI thread,
        from cached components); False when it needs components that are not cached."""
        s = self.session
        if s is None or where is None:
            return False
        try:
            preview = s.slice_preview(s.settings, *where, compute=compute)
        except ValueError:  # a weight without its map: the background job says why
            return False
        if preview is None:
            return False
        self._write_slice(preview, where)
        return True

    def _write_slice(self, preview: Any, where: tuple[int, int]) -> None:
        """Put a slice preview into the shown layers, in place (their arrays become the
        panel's: the session forgets them)."""
        s, names = self.session, self._names()
        assert s is not None
        axis, index = where
        targets = [("mask", preview.mask)]
        if preview.combined_changed:
            targets.insert(0, ("combined", preview.combined))
        for role, values in targets:
            shown = self._shown.get(role)
            if shown is None or names[role] not in self.viewer.layers:
                continue
            s.release(shown)
            grid = shown.reshape(self._shape)
            sl = [slice(None)] * grid.ndim
            sl[axis] = index
            grid[tuple(sl)] = values.reshape(grid[tuple(sl)].shape)
            layer = self.viewer.layers[names[role]]
            if role == "combined":
                limits = s.display_range()
                if tuple(layer.contrast_limits) != tuple(limits):
                    layer.contrast_limits = limits
            layer.data = layer.data  # the same array, changed: napari redraws the slice
        self._show_threshold_info("updating the whole volume")

    # ---------------------------------------------------------------- the whole volume
    def _request_update(self, debounce: bool = True) -> None:
        """The settings changed: show the slice at once when its components are cached, and
        recombine the whole volume in the background (after the debounce)."""
        self._generation += 1
        if self._preview(self.displayed_slice()):
            self._previewed = self._generation
        if debounce:
            self._timer.start()
        else:
            self._timer.stop()
            self._recombine_in_background()

    def _recombine_in_background(self) -> None:
        """Start recombining the whole volume under the current settings in a worker (after
        the running one has stopped, when there is one)."""
        s = self.session
        if s is None or self.closed:
            return
        self._timer.stop()
        where = self.displayed_slice()
        previewed = self._previewed == self._generation
        job = Recombination(self._generation, s.settings, where, previewed)
        if self._recombine_worker is not None:
            if self._recombination is not None:
                self._recombination.cancel.set()
            self._next = job
            return
        self._start_recombination(job)

    def _start_recombination(self, job: Recombination) -> None:
        from napari.qt.threading import create_worker

        session = self.session
        connect = {
            "yielded": lambda preview: self._on_recombined_slice(job, session, preview),
            "returned": lambda out: self._on_recombined(job, session, out),
            "errored": lambda exc: self._on_recombine_error(job, exc),
            "finished": lambda: self._on_recombine_finished(job),
        }
        self._recombination = job
        self._recombine_worker = create_worker(
            recombine, session, job, _start_thread=False, _connect=connect
        )
        start_worker(self._recombine_worker)

    def _current(self, job: Recombination, session: Any) -> bool:
        return not self.closed and job.generation == self._generation and session is self.session

    def _on_recombined_slice(self, job: Recombination, session: Any, preview: Any) -> None:
        if self._current(job, session) and job.where is not None:
            try:
                self._write_slice(preview, job.where)
            except Exception as exc:  # never let a display problem crash the viewer
                self._recombine_failed(exc)

    def _on_recombined(self, job: Recombination, session: Any, out: tuple) -> None:
        if self._current(job, session):
            try:
                self._show_whole(*out)
            except Exception as exc:
                self._recombine_failed(exc)
            self._whole_shown()

    def _on_recombine_error(self, job: Recombination, exc: BaseException) -> None:
        from .errors import Cancelled

        if not isinstance(exc, Cancelled) and self._current(job, self.session):
            self._recombine_failed(exc)

    def _recombine_failed(self, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        show_error("could not update the anomaly map: " + " ".join(text.split()))

    def _on_recombine_finished(self, job: Recombination) -> None:
        if job is self._recombination:
            self._recombination = None
            self._recombine_worker = None
        nxt, self._next = self._next, None
        if nxt is not None and not self.closed and nxt.generation == self._generation:
            self._start_recombination(nxt)
        elif not self._timer.isActive():  # failed or cancelled, nothing newer: a run ends
            self._whole_shown()

    def _stop_recombination(self) -> None:
        """Cancel background recombination (the panel closes)."""
        self._next = None
        if self._recombination is not None:
            self._recombination.cancel.set()

    # ---------------------------------------------------------------- sliders
    def _read_settings(self) -> None:
        """The session's settings from the sliders. A slider that shows a setting to its own
        precision (a model's default threshold of 3.9486313 shows as 3.948631) keeps the exact
        setting, so that the panel computes what the command line computes; a threshold within half
        the slider's step of the model's default (3.79 typed for 3.7909410) is the default."""
        if self.session is None:
            return
        st = self.session.settings
        others = {k: v for k, v in st.weights.items() if k not in self.weights}  # no slider
        computed = self.session.result.maps
        moved = {
            k: _kept(float(w.value), st.weights.get(k, 0.0))
            for k, w in self.weights.items()
            if w.value and k in computed
        }
        weights = {**others, **moved}
        scan_normalise = bool(self.scan_normalise.value)
        top = max(4.0, 3.0 * sum(weights.values()), 10.0 if scan_normalise else 0.0)
        if top > self.threshold.max:  # growing the range never moves the value
            self.threshold.max = top
        threshold = _kept(float(self.threshold.value), st.threshold)
        default = self.session.default_settings().threshold
        if abs(threshold - default) <= 0.5 * float(self.threshold.step or 0.0):
            threshold = default  # shown alike (3.79 for 3.790941): the default, and its rates
        new = st.replace(
            weights=weights,
            scan_normalise=scan_normalise,
            threshold=threshold,
            min_size_mm3=_kept(float(self.min_size.value), st.min_size_mm3),
        )
        smoothing = _kept(float(self.smoothing.value), st.smoothing_mm)
        if smoothing != st.smoothing_mm:  # the levels keep their healthy rates where known
            new = at_smoothing(new, self.session.card, smoothing, self.session.calibration)
            if new.threshold != threshold:
                self._show_threshold(new.threshold)
        if not self.outline.value:
            new = new.without_outline()
        elif new.grow_threshold is None:  # turned on: the model's outline, at this smoothing
            s = self.session
            d = at_smoothing(s.default_settings(), s.card, new.smoothing_mm, s.calibration)
            new = new.replace(
                grow_threshold=d.grow_threshold,
                outline_fraction=d.outline_fraction,
                outline_smoothing_mm=d.outline_smoothing_mm,
            )
        self.session.settings = new

    def _show_threshold(self, threshold: float) -> None:
        """Move the threshold slider to ``threshold`` without it counting as a move."""
        self._quiet = True
        try:
            self.threshold.value = min(threshold, self.threshold.max)
        finally:
            self._quiet = False

    def _show_settings(self, st: Any) -> None:
        self._quiet = True
        try:
            for k, w in self.weights.items():
                w.value = min(float(st.weights.get(k, 0.0)), w.max)
            self.smoothing.value = st.smoothing_mm
            self.scan_normalise.value = bool(st.scan_normalise)
            if st.scan_normalise and self.threshold.max < 10.0:
                self.threshold.max = 10.0
            self.threshold.value = min(st.threshold, self.threshold.max)
            self.outline.value = st.grow_threshold is not None
            if self.session is not None:  # the card gives the grow level: none, nothing to turn on
                self.outline.enabled = self.session.default_settings().grow_threshold is not None
            self.min_size.value = min(st.min_size_mm3, self.min_size.max)
        finally:
            self._quiet = False

    def _on_slider(self, *_: Any) -> None:
        if self._quiet or self.session is None or self.closed:
            return
        try:
            self._read_settings()
            self._request_update()  # the shown slice now, the whole volume after the debounce
        except Exception as exc:  # never let a slider crash the viewer
            self._recombine_failed(exc)

    def restore_defaults(self, *_: Any) -> None:
        """Set every slider to the model's defaults (the session's model after a run)."""
        self._apply_preset("default")

    def paper_settings(self, *_: Any) -> None:
        """Set every slider to the paper's method (``CombineSettings.preset("paper")``)."""
        self._apply_preset("paper")

    def _apply_preset(self, name: str) -> None:
        from .combine import CombineSettings

        card = self.session.card if self.session is not None else self._card()
        if card is None:
            return
        st = CombineSettings.preset(name, card)
        if self.session is not None:
            self.session.settings = st
        self._show_settings(st)
        if self.session is not None:
            self._read_settings()
            self._request_update(debounce=False)
