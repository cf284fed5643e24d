"""The run's life cycle in the "Localize anomalies" panel.

A run belongs to the scan layer, volume and model it started with (:class:`Job`); its result goes
to layers named after that scan, and the "result" line names scan and model, whatever is selected
meanwhile. It runs in a napari thread worker; progress and stage names reach the GUI thread
through queued Qt signals (:class:`Relay`), the progress bar names each stage (a busy bar while
preparing), and the fit line under it says how the scan fits the model (or why it was refused).
Removing the scan layer cancels the run (a result that arrives anyway is dropped). Closing the
panel or the viewer cancels the run and the modality guess, and everything they still send is
ignored (:meth:`RunMixin.close_down`; slots that workers, timers or the viewer call are wrapped in
:func:`live`). At interpreter exit, workers still running are waited for.
"""

from __future__ import annotations

import atexit
import functools
import gc
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, Signal

from ._widget_controller import (
    FIT_TOOLTIP,
    TOOLTIPS,
    Session,
    fit_text,
    fit_tooltip,
    in_panel_words,
    layer_help,
    offers_preparation_layers,
    panel_map_dtype,
    panel_maps,
    prepare_mode_for,
)
from ._widget_layers import preparation_layer_data, put_preparation_layers, scan_inputs

#: preparation stages, shown with a busy bar (they report no fraction done)
BUSY_STAGES = ("checking the scan", "bias-field correction", "brain extraction", "registration")
#: colours of the fit line by level
FIT_STYLE = {"ok": "", "none": "", "warn": "color: #e8a33d;", "fail": "color: #f06464;"}
#: how long quitting waits for the panel's workers to stop (ms)
EXIT_WAIT_MS = 20_000
#: the steps after the last slice, shown one by one on the progress bar: the engine's last
#: stage, then the worker's, then the GUI thread's
FINISH_STEPS = (
    "mapping back to the scan",
    "computing the scales",
    "combining the maps",
    "adding the layers",
)
_STARTED = False  # whether a worker was started (then exit waits for workers)


def live(method: Callable) -> Callable:
    """Wrap a slot that workers, timers or the viewer call: once the panel is closed it does
    nothing (its Qt widgets may be gone)."""

    @functools.wraps(method)
    def slot(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.closed:
            return None
        return method(self, *args, **kwargs)

    return slot


class ParentWatch(QObject):
    """Calls ``on_closed`` when the watched widget loses its parent after having had one:
    napari's close button on a dock takes the panel out of its dock (and deletes the dock),
    without destroying the panel."""

    def __init__(self, on_closed: Callable[[], None]) -> None:
        super().__init__()
        self._on_closed = on_closed
        self._docked = False

    def eventFilter(self, obj: Any, event: Any) -> bool:
        if event.type() == QEvent.Type.ParentChange:
            if obj.parent() is not None:
                self._docked = True
            elif self._docked:
                self._on_closed()
        return False


def start_worker(worker: Any) -> None:
    """Start a thread worker; the first one registers :func:`_wait_for_workers` to run at
    exit."""
    global _STARTED
    if not _STARTED:
        _STARTED = True
        atexit.register(_wait_for_workers)
    worker.start()


def _wait_for_workers() -> None:
    """At interpreter exit, let workers still running (a cancelled run finishing its batch,
    the device list importing torch) end before Qt deletes the objects they report through;
    otherwise quitting napari mid-run aborts the process."""
    from qtpy.QtCore import QThreadPool

    QThreadPool.globalInstance().waitForDone(EXIT_WAIT_MS)


class Relay(QObject):
    """Carries progress and stage names from the worker thread to the GUI thread (queued
    signals)."""

    progress = Signal(int, int)
    stage = Signal(str)
    step = Signal(str)  # the panel's own steps after scoring (FINISH_STEPS)


@dataclass
class Job:
    """One run: what it was started on, so that its result stays tied to it."""

    layer: Any  # the scan layer
    base: str  # the result layers' name prefix: the layer's name (and volume)
    model: str  # the model's name in the list
    cancel: threading.Event = field(default_factory=threading.Event)
    stage: str = ""  # the stage it is in
    reason: str = ""  # why the panel cancelled it (the scan layer was removed)
    finished: bool = False
    started: float = field(default_factory=time.perf_counter)  # the click, perf_counter s


class RunMixin:
    """The run part of :class:`~napari_vaeloc._widget.LocalizeWidget`: start, cancel, close down,
    the worker's signals, the progress bar, the fit line and showing a result. It uses the
    panel's controls and state (``image``, ``model``, ``progress``, ``job``, ``session``, ...)."""

    def _init_run(self) -> None:
        """The run's state (before the panel is laid out)."""
        self.running = False
        self.job: Job | None = None  # the running (or last) run
        self._worker: Any = None
        self._relay = Relay()
        self._relay.progress.connect(self._on_progress)
        self._relay.stage.connect(self._on_stage)
        self._relay.step.connect(self._on_step)
        self._adding = False  # result layers are being added (the run is not over yet)
        #: the fit line: layer, model (None: a line on the scan alone), text, level, tooltip
        self._fit: tuple[Any, str | None, str, str, str] | None = None

    def close_down(self, *_: Any) -> None:
        """The panel or the viewer is closing: cancel the run and the modality guess, and from
        now on ignore whatever workers, timers and the viewer still send (a run's result is
        never shown). Called when the panel's dock or the panel itself is destroyed."""
        if self.closed:
            return
        self.closed = True
        if self.job is not None:
            self.job.cancel.set()
        self._stop_guess()
        self._stop_recombination()
        for emitter, slot in self._viewer_events:
            emitter.disconnect(slot)
        for name in ("progress", "stage", "step"):
            try:  # nothing connected, or Qt deleted the relay already (at exit)
                getattr(self._relay, name).disconnect()
            except (TypeError, RuntimeError):
                pass
        try:
            self._timer.stop()
        except RuntimeError:  # deleted with the application
            pass

    @live
    def _on_layer_removed(self, event: Any) -> None:
        """The scan of the running job was removed: cancel it (its result would have no scan
        under it)."""
        job = self.job
        if job is not None and self.running and event.value is job.layer:
            job.reason = f"the scan layer '{job.layer.name}' was removed"
            job.cancel.set()

    def run(self, *_: Any) -> None:
        """Start a localization of the chosen layer (the chosen volume of a 4D layer) in a
        thread worker. A scan that cannot be scored (constant, all non-finite, ...) is refused
        here, with one line; notes on an unusual scan (one that looks like a mask) are shown
        as warnings before the run starts."""
        from napari.qt.threading import create_worker

        from .io import Volume

        if self.running or self.exporting or self.closed:
            return
        layer = self.image.value
        model_name = self.model.value
        folder = self._folders.get(model_name or "")
        if layer is None or folder is None:
            show_warning("choose an image layer and a model first")
            return
        index = self._volume_index(layer)
        try:
            inputs = scan_inputs(layer, index)
            mode, note = prepare_mode_for(self.prepare.value, inputs["shape"])
            volume = Volume.from_array(
                inputs["data"], inputs["affine"], header=inputs["header"], path=inputs["path"],
                missing=inputs["missing"],
            )  # fmt: skip
        except ValueError as exc:  # InputError is one
            self._show_failure(layer, str(exc))
            return
        for line in volume.notes:
            show_warning(f"{layer.name}: {line}")
        self._stop_guess_for_run(self.guess_prepares_as_run(mode, inputs["shape"]))
        # the viewer's objects are long-lived: moved out of the garbage collector's reach,
        # a full collection no longer walks them (it took 0.05-0.26 s, growing with the
        # session, and fell while the result layers were being added)
        gc.freeze()
        base = layer.name if index is None else f"{layer.name} volume {index}"
        job = Job(layer=layer, base=base, model=str(model_name))
        self.job = job
        axis = None if self.axis.value == "model" else self.axis.value
        keep = (self._last_run_model, self.session.settings) if self.session is not None else None
        args = {
            "folder": folder, "axis": axis, "device": self.device.value, "prepare": mode,
            "note": note, "shape": inputs["shape"], "keep": keep,
        }  # fmt: skip
        if mode != "none":
            self._set_fit(layer, "checking how the scan fits the model…", "none", model=job.model)
        self.runs += 1
        connect = {
            "returned": lambda out: self._on_done(job, out),
            "errored": lambda exc: self._on_error(job, exc),
            "finished": lambda: self._on_finished(job),
        }
        self._worker = create_worker(
            self._work, job, volume, args, _start_thread=False, _connect=connect
        )
        self.running = True
        self._show_busy()
        self.progress.value, self.progress.max = 0, 1
        self.progress.label = "loading model"
        start_worker(self._worker)

    def _work(self, job: Job, volume: Any, args: dict) -> tuple:
        """Runs in the worker thread: load the model (cached) and score the scan."""
        from .engine import EngineOptions, localize
        from .errors import Cancelled
        from .models.store import cached_model

        model = cached_model(args["folder"])
        if job.cancel.is_set():
            raise Cancelled("localization cancelled")
        options = EngineOptions(
            device=args["device"],
            batch_size=self.batch_size,
            progress=self._relay.progress.emit,
            cancel=job.cancel.is_set,
            stage=self._relay.stage.emit,
            map_dtype=panel_map_dtype(args["shape"]),
            defer_maps=True,  # a map no layer shows and no weight uses is not made yet
        )
        result = localize(
            volume, model, options, axis=args["axis"], prepare=args["prepare"],
            maps=panel_maps(model.card),
        )  # fmt: skip
        # everything after the network that needs the whole volume runs here, off the GUI
        # thread: the scales (percentiles if uncalibrated), the map layers' contrast limits,
        # and the combination the sliders will show
        self._relay.step.emit(FINISH_STEPS[1])
        session = Session(result)
        if offers_preparation_layers(result):  # their whole-volume work, here too
            args["preparation_layers"] = preparation_layer_data(result.prepared, args["shape"])
        if job.cancel.is_set():
            raise Cancelled("localization cancelled")
        self._relay.step.emit(FINISH_STEPS[2])
        keep = args["keep"]
        settings = keep[1] if keep is not None and keep[0] == model.path else session.settings
        try:
            session.combined(settings, job.cancel.is_set)
            session.cut_note(session.mask(settings, job.cancel.is_set))  # kept for the panel
        except ValueError:  # a weight without its map: shown (and explained) by the sliders
            pass
        if job.cancel.is_set():
            raise Cancelled("localization cancelled")
        return session, model, args

    def cancel(self, *_: Any) -> None:
        """Ask the running worker to stop: inside the preparation stage it is in, or at the
        next batch of slices."""
        if self.job is not None:
            self.job.cancel.set()
        self.cancel_button.enabled = False

    def _show_busy(self) -> None:
        """Enable the controls that make sense now: no new run or export while one is going,
        Cancel only during a run, no tuning while the result is being written."""
        busy = self.running or self.exporting
        self.run_button.enabled = not busy
        self.cancel_button.enabled = self.running
        self.export_button.enabled = not busy and self.session is not None
        maps = self.session.result.maps if self.session is not None else None
        computed = {w: maps is None or k in maps for k, w in self.weights.items()}
        for w in self._tuning:  # a weight whose map the run did not compute stays off
            w.enabled = not self.exporting and computed.get(w, True)

    def _on_finished(self, job: Job) -> None:
        job.finished = True
        if job is not self.job or self._adding:  # the layers are still being added
            return
        self.running = False
        self._worker = None
        if self.closed:
            return
        self._show_busy()
        if self.progress.max == 0:  # a busy bar stops being busy
            self.progress.max = 1

    @live
    def _on_stage(self, name: str) -> None:
        """A stage began: name it on the progress bar (a busy bar while preparing)."""
        if self.job is not None:
            self.job.stage = name
        if name in FINISH_STEPS:
            self._on_step(name)
            return
        if name in BUSY_STAGES and self.progress.value == 0:
            self.progress.max = 0
        self.progress.label = name

    @live
    def _on_step(self, name: str) -> None:
        """A step after the last slice began: the bar counts them (1 to 4)."""
        if self.job is not None:
            self.job.stage = name
        self.progress.max = len(FINISH_STEPS)
        self.progress.value = FINISH_STEPS.index(name) + 1
        self.progress.label = f"{name} ({self.progress.value}/{self.progress.max})"

    @live
    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = done
        self.progress.label = f"{done}/{total} slices"

    @live
    def _on_error(self, job: Job, exc: BaseException) -> None:
        from .errors import Cancelled, VaelocError

        if isinstance(exc, Cancelled):
            during = f" during {job.stage}" if job.stage else ""
            self.progress.max = max(self.progress.max, 1)
            self.progress.value, self.progress.label = 0, f"cancelled{during}"
            if job.reason:
                line = f"run cancelled: {job.reason}; no layers were added"
                self._set_fit(job.layer, line, "warn", model=job.model)
                show_warning(line)
            else:
                line = f"run cancelled{during}; no layers were changed"
                self._set_fit(job.layer, line, "none", model=job.model)
                show_info("localization cancelled; no layers were changed")
        elif isinstance(exc, VaelocError | ValueError | MemoryError):
            report = getattr(exc, "report", None)  # a misfit: what preparation found
            found = "\n".join(report.refusal_lines()) if report is not None else ""
            self._show_failure(job.layer, str(exc), found, model=job.model)
        else:
            self._show_failure(job.layer, f"{type(exc).__name__}: {exc}", model=job.model)

    def _show_failure(
        self, layer: Any, message: str, found: str = "", model: str | None = None
    ) -> None:
        """A run was refused or failed: the fit line (red) and a notification say why, the
        progress bar says "not localized"; ``found`` (the preparation's steps and checks of a
        refused scan) is the fit line's tooltip. The shown result, if any, stays as it was,
        with its layers, sliders and export (the "result" line names its scan and model).
        ``model``: the model the run used (None for a scan that could not be read)."""
        message = in_panel_words(" ".join(message.split()))
        self._set_fit(layer, f"not localized: {message}", "fail", found, model=model)
        self.progress.max, self.progress.value = 1, 0
        self.progress.label = "not localized"
        show_error(f"localization failed: {message}")

    def _set_fit(
        self, layer: Any, text: str, level: str, tooltip: str = "", model: str | None = None
    ) -> None:
        """Show the fit line of ``layer`` and ``model`` (the model its run used; None for a
        line on the scan alone): it is hidden while another image or another model is
        selected, since it says nothing about them."""
        self._fit = (layer, model, text, level, tooltip)
        self._show_fit()

    def _show_fit(self) -> None:
        fit = self._fit
        shown = (
            fit is not None
            and fit[0] is self.image.value
            and (fit[1] is None or fit[1] == self.model.value)
        )
        text, level, tooltip = fit[2:] if fit is not None and shown else ("", "none", "")
        self.fit_info.value = text
        self.fit_info.tooltip = tooltip or FIT_TOOLTIP
        self.fit_info.native.setStyleSheet(FIT_STYLE.get(level, ""))

    @live
    def _on_done(self, job: Job, out: tuple) -> None:
        """The run's result arrived: name the last step on the bar, and add the layers on the
        next turn of the event loop (so that the bar shows it first); the run ends then."""
        from qtpy.QtCore import QTimer

        self._on_step(FINISH_STEPS[3])
        self._adding = True

        def done() -> None:
            self._adding = False
            if job.finished:
                self._on_finished(job)

        steps = self._add_result(job, out)

        def add() -> None:  # one step per turn of the event loop
            waiting, more = False, False
            try:
                if not self.closed:
                    next(steps)
                    more = True
            except StopIteration as stop:
                waiting = stop.value is False
            finally:
                if more:  # 1 ms, not 0: a zero timer would come before other due timers
                    QTimer.singleShot(1, add)
                elif waiting:  # the run ends when the whole combination is shown
                    self._when_whole = done
                else:
                    done()

        QTimer.singleShot(0, add)

    def _add_result(self, job: Job, out: tuple) -> Iterator[None]:
        """Show a run's result, a generator that yields after each layer it adds (napari takes
        up to a tenth of a second for one; the viewer stays responsive in between). Returns
        False when its combination is still being computed in the background (it will be
        shown when it is done)."""
        session, model, args = out
        result = session.result
        layer = job.layer
        if job.reason or layer not in self.viewer.layers:
            why = job.reason or f"the scan layer '{layer.name}' was removed"
            show_warning(f"result dropped: {why} during the run; no layers were added")
            self.progress.max, self.progress.value = 1, 0
            self.progress.label = "result dropped"
            return True
        try:
            first = self.session is None  # sliders show this model's defaults or user edits
            keep = not first and self._last_run_model == model.path
            old = self.session.settings if keep and self.session is not None else None
            self.session = session
            self._last_run_model = model.path
            self._input_layer, self._shape, self._base = layer, args["shape"], job.base
            self._result_model = job.model
            if old is not None:
                self.session.settings = old
            elif not first:  # another model: start from its defaults
                self._show_settings(self.session.settings)
            self._read_settings()
            yield from self._update_maps()
            yield from self._show_first()
            shown = self._show_result()
            self.result_info.value = (
                f"{job.base}, model {job.model} ({result.slices}, {result.device})"
            )
            self.result_info.tooltip = f"{TOOLTIPS['result']}\n{layer_help(job.base)}"
            text, level = fit_text(result, args["prepare"], args["note"])
            self._set_fit(layer, text, level, fit_tooltip(result), model=job.model)
            if "preparation_layers" in args:  # a turn of the event loop after each layer
                for _ in put_preparation_layers(
                    self.viewer, args["preparation_layers"], layer, job.base
                ):
                    yield
            self.progress.max = max(self.progress.max, 1)
            self.progress.value = self.progress.max
            took = time.perf_counter() - job.started  # from the click to the layers
            self.progress.label = f"done in {took:.1f} s on {result.device}"
            from .engine import MISSING_NOTE

            for line in result.notes:
                if line not in result.volume.notes:  # those were shown at the click
                    (show_warning if MISSING_NOTE in line else show_info)(line)
            return shown
        except Exception as exc:  # never let a display problem crash the viewer
            show_error(f"could not show the result: {type(exc).__name__}: {exc}")
            return True
