"""The "Localize anomalies" dock widget: layout and event wiring only.

The expensive run happens in a napari thread worker (progress bar, Cancel, GUI stays live); its
cached result lives in a :class:`~napari_vaeloc._widget_controller.Session`, which recombines and
re-thresholds on every (debounced) slider move without touching the network. torch is imported
only inside the worker, through the engine. Export writes in a worker too.

Before scoring, the engine prepares the scan ("prepare scan": bias-field correction, brain
extraction, registration to the model's template); each stage's name reaches the progress bar
through a queued Qt signal, Cancel works inside every stage, and the fit line under the progress
bar says how the scan fits the model (or why it was refused). When an image is selected, a
second worker guesses its modality and preselects a model of that modality.

Life cycle: a run belongs to the scan layer, volume and model it started with (:class:`_Job`);
its result goes to layers named after that scan, and the "result" line names scan and model,
whatever is selected meanwhile. Removing the scan layer cancels the run (a result that arrives
anyway is dropped). Closing the panel or the viewer cancels the run and the modality guess, and
everything they still send is ignored (:meth:`LocalizeWidget.close_down`).
"""

from __future__ import annotations

import atexit
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, QTimer, Signal

from ._widget_controller import (
    FIT_TOOLTIP,
    MAP_LABELS,
    MAP_LAYERS,
    PREPARE_CHOICES,
    PREPARE_TOOLTIP,
    TOOLTIPS,
    Session,
    choose_model,
    fit_text,
    fit_tooltip,
    guessed_correlation,
    layer_help,
    offers_preparation_layers,
    prepare_mode_for,
    weight_tooltip,
)
from ._widget_export import (
    ask_export_path,
    ask_overwrite,
    export_failure,
    export_plan,
    export_session,
    suggested_path,
)
from ._widget_layers import ROLE_KEY, n_volumes, put_layer, put_preparation_layers, scan_inputs
from .mapnames import AXIS_NAMES, SLIDER_MAPS
from .prepare import too_thin

FOLDER_CHOICE = "__folder__"
DEBOUNCE_MS = 50
#: preparation stages, shown with a busy bar (they report no fraction done)
BUSY_STAGES = ("checking the scan", "bias-field correction", "brain extraction", "registration")
#: colours of the fit line by level
FIT_STYLE = {"ok": "", "none": "", "warn": "color: #e8a33d;", "fail": "color: #f06464;"}
#: how long quitting waits for the panel's workers to stop (ms)
EXIT_WAIT_MS = 20_000
_STARTED = False  # whether a worker was started (then exit waits for workers)


def _available_devices() -> list[str]:
    from .engine import available_devices  # imports torch: call in a worker thread

    return available_devices()


def _guess_modality(inputs: dict, cancel: Callable[[], bool]) -> tuple[str, str]:
    """Runs in a worker thread: the modality the scan looks like and its correlation with that
    modality's template (prepared once per scan content, then cached)."""
    from .io import Volume
    from .prepare import guess_modality

    vol = Volume.from_array(
        inputs["data"], inputs["affine"], header=inputs["header"], path=inputs["path"]
    )
    modality, prepared = guess_modality(vol, cancel=cancel)
    check = prepared.report.check("modality")
    return modality, guessed_correlation(check.message) if check is not None else ""


def _live(method: Callable) -> Callable:
    """Wrap a slot that workers, timers or the viewer call: once the panel is closed it does
    nothing (its Qt widgets may be gone)."""

    @functools.wraps(method)
    def slot(self: LocalizeWidget, *args: Any, **kwargs: Any) -> Any:
        if self.closed:
            return None
        return method(self, *args, **kwargs)

    return slot


class _ParentWatch(QObject):
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


def _start(worker: Any) -> None:
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


class _Relay(QObject):
    """Carries progress and stage names from the worker thread to the GUI thread (queued
    signals)."""

    progress = Signal(int, int)
    stage = Signal(str)


@dataclass
class _Job:
    """One run: what it was started on, so that its result stays tied to it."""

    layer: Any  # the scan layer
    base: str  # the result layers' name prefix: the layer's name (and volume)
    model: str  # the model's name in the list
    cancel: threading.Event = field(default_factory=threading.Event)
    stage: str = ""  # the stage it is in
    reason: str = ""  # why the panel cancelled it (the scan layer was removed)
    finished: bool = False


class LocalizeWidget(Container):
    """Dock widget: pick scan, model, device and axis; run; tune the combination live; export."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session: Session | None = None
        self.batch_size = 64
        self.running = False
        self.exporting = False
        self.closed = False
        self.runs = 0  # how many times the network was run (tests check sliders don't run it)
        self.confirm = self._ask_overwrite  # replaceable in tests
        self.job: _Job | None = None  # the running (or last) run
        self._worker: Any = None
        self._export_worker: Any = None
        self._folders: dict[str, str] = {}  # choice value -> model folder
        self._last_model = ""
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self._relay.stage.connect(self._on_stage)
        self._picks = 0  # models chosen by hand (a modality guess never overrides one)
        self._guess_worker: Any = None
        self._guess_token = 0  # results of older guesses are ignored
        self._guess_cancel = threading.Event()
        self._guess: dict[str, Any] | None = None  # the modality guess's state for the label
        self._model_text = ""
        self._fit: tuple[Any, str, str, str] | None = None  # layer, text, level, tooltip
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._on_timer)
        self._quiet = False
        self._input_layer: Any = None  # the scan of the shown result
        self._base = ""  # the shown result's layer-name prefix
        self._shape: tuple[int, ...] = ()
        self._last_run_model: Any = None
        self._shown_combined: Any = None  # the combined map the layer shows now
        self._volume_layer: Any = None  # the 4D layer the volume box was set for
        self._volume_by_hand = False
        self._build()
        self._viewer_events = [
            (self.viewer.layers.events.inserted, self._on_layers_changed),
            (self.viewer.layers.events.removed, self._on_layers_changed),
            (self.viewer.layers.events.removed, self._on_layer_removed),
            (self.viewer.dims.events.current_step, self._on_dims),
        ]
        for emitter, slot in self._viewer_events:
            emitter.connect(slot)
        self.image.changed.connect(self._on_image_changed)
        self.native.destroyed.connect(self.close_down)  # the viewer closed
        self._parent_watch = _ParentWatch(self.close_down)  # the panel's close button
        self.native.installEventFilter(self._parent_watch)
        self._sync_volume()
        self._describe_model()
        self._start_guess()

    # ---------------------------------------------------------------- layout
    def _build(self) -> None:
        from napari.qt.threading import create_worker

        from .models.store import bundled_models

        self.image = ComboBox(label="image", choices=self._image_choices, nullable=False)
        self.volume = SpinBox(label="volume", min=0, max=0, value=0, visible=False)
        for name, folder in bundled_models().items():
            self._folders[name] = str(folder)
        first = next(iter(self._folders), None)
        self.model = ComboBox(
            label="model", choices=self._model_choices, nullable=True, value=first
        )
        self.model_info = Label(label="")
        self._devices: list[str] | None = None  # filled by a worker: importing torch takes ~2 s
        self.device = ComboBox(label="device", choices=self._device_choices, value="auto")
        _start(
            create_worker(
                _available_devices, _start_thread=False, _connect={"returned": self._set_devices}
            )
        )
        self.axis = ComboBox(
            label="slicing axis",
            choices=[("model's axis", "model"), *[(a, a) for a in AXIS_NAMES]],
        )
        self.prepare = ComboBox(label="prepare scan", choices=PREPARE_CHOICES, value="auto")
        self.run_button = PushButton(text="Localize")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.fit_info = Label(label="fit", value="")
        self.result_info = Label(label="result", value="none yet")
        self.weights = {
            k: FloatSlider(
                label=f"weight: {MAP_LABELS[k][0]}", min=0.0, max=2.0, step=0.05, value=0.0
            )
            for k in SLIDER_MAPS
        }
        self.smoothing = FloatSlider(label="smoothing (mm)", min=0.0, max=8.0, step=0.25)
        self.scan_normalise = CheckBox(
            text="normalise per scan (threshold in robust z-units)", value=False
        )
        self.threshold = FloatSlider(label="threshold", min=0.0, max=4.0, step=0.01, value=1.0)
        self.threshold_info = Label(label="")
        self.min_size = FloatSlider(label="min size (mm³)", min=0.0, max=4000.0, step=8.0)
        self.defaults_button = PushButton(text="Restore model defaults")
        self.export_maps = CheckBox(text="export the maps and scores too", value=False)
        self.export_button = PushButton(text="Export mask…", enabled=False)
        tips = {
            "image": self.image, "volume": self.volume, "model": self.model,
            "model_info": self.model_info, "device": self.device, "axis": self.axis,
            "run": self.run_button, "cancel": self.cancel_button, "progress": self.progress,
            "result": self.result_info, "smoothing": self.smoothing,
            "scan_normalise": self.scan_normalise, "threshold": self.threshold,
            "threshold_info": self.threshold_info, "min_size": self.min_size,
            "defaults": self.defaults_button, "export_maps": self.export_maps,
            "export": self.export_button,
        }  # fmt: skip
        for key, widget in tips.items():
            widget.tooltip = TOOLTIPS[key]
        self.prepare.tooltip = PREPARE_TOOLTIP
        self.fit_info.tooltip = FIT_TOOLTIP
        for k, slider in self.weights.items():
            slider.tooltip = weight_tooltip(k)
        for label in (self.model_info, self.threshold_info, self.fit_info, self.result_info):
            label.native.setWordWrap(True)
        self.extend(
            [
                self.image, self.volume, self.model, self.model_info, self.device, self.axis,
                self.prepare, self.run_button, self.cancel_button, self.progress, self.fit_info,
                self.result_info, *self.weights.values(), self.smoothing, self.scan_normalise,
                self.threshold, self.threshold_info,
                self.min_size, self.defaults_button, self.export_maps, self.export_button,
            ]
        )  # fmt: skip
        #: controls that change the shown result's settings (fixed while it is exported)
        self._tuning = [
            *self.weights.values(), self.smoothing, self.scan_normalise, self.threshold,
            self.min_size, self.defaults_button, self.export_maps,
        ]  # fmt: skip
        self._model_guard = False
        self.model.changed.connect(self._on_model_changed)
        self.volume.changed.connect(self._on_volume_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        for w in (
            *self.weights.values(),
            self.smoothing,
            self.scan_normalise,
            self.threshold,
            self.min_size,
        ):
            w.changed.connect(self._on_slider)
        self.defaults_button.changed.connect(self.restore_defaults)
        self.export_button.changed.connect(self._on_export_clicked)

    def _device_choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        avail = self._devices
        if avail is None:
            return [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("mps", "mps")]
        return [(f"auto ({avail[0]})", "auto")] + [
            (d if d in avail else f"{d} (not available)", d) for d in ("cpu", "cuda", "mps")
        ]

    @_live
    def _set_devices(self, devices: list[str]) -> None:
        self._devices = list(devices)
        self.device.reset_choices()

    def _model_choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        return [(n, n) for n in self._folders] + [("load from folder…", FOLDER_CHOICE)]

    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Image) and ROLE_KEY not in layer.metadata and not layer.rgb
        ]

    # ---------------------------------------------------------------- life cycle
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
        for emitter, slot in self._viewer_events:
            emitter.disconnect(slot)
        for name in ("progress", "stage"):
            try:  # nothing connected, or Qt deleted the relay already (at exit)
                getattr(self._relay, name).disconnect()
            except (TypeError, RuntimeError):
                pass
        try:
            self._timer.stop()
        except RuntimeError:  # deleted with the application
            pass

    @_live
    def _on_layers_changed(self, *_: Any) -> None:
        self.image.reset_choices()

    @_live
    def _on_layer_removed(self, event: Any) -> None:
        """The scan of the running job was removed: cancel it (its result would have no scan
        under it)."""
        job = self.job
        if job is not None and self.running and event.value is job.layer:
            job.reason = f"the scan layer '{job.layer.name}' was removed"
            job.cancel.set()

    # ---------------------------------------------------------------- 4D scans
    def _volume_index(self, layer: Any) -> int | None:
        """The volume to localize of ``layer`` (None unless it holds several volumes)."""
        if layer is None or layer is not self._volume_layer:
            return None
        return int(self.volume.value)

    def _shown_volume(self, layer: Any, n: int) -> int:
        """The volume of a 4D ``layer`` the viewer shows now."""
        dims = self.viewer.dims
        point = list(dims.point)[-layer.ndim :]
        try:
            index = float(layer.world_to_data(point)[0])
        except Exception:  # an unusual transform: fall back to the slider position
            index = float(dims.current_step[-layer.ndim])
        return int(min(max(round(index), 0), n - 1))

    def _sync_volume(self) -> None:
        """Show the volume box for a 4D layer only, at the volume the viewer shows (until a
        volume is picked by hand)."""
        layer = self.image.value
        n = n_volumes(layer) if layer is not None else 1
        four_d = layer is not None and layer.ndim == 4
        if layer is not self._volume_layer:
            self._volume_by_hand = False
        self._volume_layer = layer if four_d else None
        self._quiet = True
        try:
            if four_d:
                self.volume.max = max(n - 1, 0)
                if not self._volume_by_hand:
                    self.volume.value = self._shown_volume(layer, n)
            self.volume.visible = four_d
        finally:
            self._quiet = False

    @_live
    def _on_dims(self, *_: Any) -> None:
        if self._volume_layer is not None and not self._volume_by_hand:
            self._sync_volume()

    def _on_volume_changed(self, *_: Any) -> None:
        if not self._quiet:
            self._volume_by_hand = True

    # ---------------------------------------------------------------- model
    def add_model_folder(self, folder: str | Path) -> bool:
        """Offer a model folder in the model list and select it; False (and a notification)
        when it is not a model folder."""
        from .errors import ModelError
        from .models.store import read_card

        try:
            card = read_card(folder)
        except ModelError as exc:
            show_error(str(exc))
            return False
        key = f"{card.name} ({Path(folder).name})" if card.name in self._folders else card.name
        self._folders[key] = str(folder)
        self._picked_by_hand()
        self._model_guard = True
        try:
            self.model.reset_choices()
            self.model.value = key
        finally:
            self._model_guard = False
        self._describe_model()
        return True

    def _on_model_changed(self, *_: Any) -> None:
        if self._model_guard:
            return
        if self.model.value == FOLDER_CHOICE:
            from qtpy.QtWidgets import QFileDialog

            folder = QFileDialog.getExistingDirectory(self.native, "Model folder")
            if not (folder and self.add_model_folder(folder)):
                self._model_guard = True
                try:
                    last = self._last_model if self._last_model in self._folders else None
                    self.model.value = last
                finally:
                    self._model_guard = False
            return
        self._picked_by_hand()
        self._describe_model()

    def _picked_by_hand(self) -> None:
        self._picks += 1
        if self._guess is not None:
            self._guess["chosen"] = None

    def _describe_model(self) -> None:
        value = self.model.value
        if value is None or value == FOLDER_CHOICE:
            self._model_text = "no model: load one from a folder"
            self._show_model_info(None)
            return
        self._last_model = value
        card = self._card()
        if card is None:
            return
        cal = "calibrated" if card.calibration else "uncalibrated (thresholds relative to the scan)"
        self._model_text = f"{card.modality}, {card.axis}; {cal}"
        self._show_model_info(card)
        self.model_info.tooltip = (
            f"{TOOLTIPS['model_info']}\n{card.provenance.description}\n{card.provenance.sources}"
        )
        if self.session is None:
            self.restore_defaults()

    def _show_model_info(self, card: Any = None) -> None:
        """The model's line, with what the modality guess found under it."""
        line = self._guess_line(card)
        self.model_info.value = self._model_text + (f"\n{line}" if line else "")

    def _guess_line(self, card: Any) -> str:
        g = self._guess
        if g is None:
            return ""
        if g["state"] == "running":
            return "checking which modality the scan looks like…"
        if g["state"] == "stopped":
            return "modality not checked: a run started first"
        if g["state"] == "failed":
            return f"could not tell the scan's modality ({g['message']}); model left as it is"
        modality, r = g["modality"], g["r"]
        looks = f"the scan looks like {modality}" + (f" (r = {r})" if r else "")
        if g["chosen"] is not None and g["chosen"] == self.model.value:
            return f"{modality} model chosen: {looks}"
        if card is not None and str(card.modality).lower() != modality.lower():
            return f"{looks}, but this model learned {card.modality} scans"
        if not g["found"]:
            return f"{looks}; no {modality} model with a template is loaded"
        return looks

    # ---------------------------------------------------------------- modality guess
    @property
    def guessing(self) -> bool:
        """True while the modality of the selected image is being guessed."""
        return self._guess_worker is not None

    @_live
    def _on_image_changed(self, *_: Any) -> None:
        self._sync_volume()
        self._show_fit()
        self._start_guess()

    def _start_guess(self, *_: Any) -> None:
        """Guess the selected image's modality in a worker and preselect a model for it (unless
        a model is picked by hand meanwhile); a new selection makes older guesses stale."""
        from napari.qt.threading import create_worker

        self._stop_guess()
        self._guess = None
        layer = self.image.value
        inputs = None
        if layer is not None:
            try:
                inputs = scan_inputs(layer, self._volume_index(layer))
            except ValueError:
                inputs = None
        if inputs is None or too_thin(inputs["shape"]):
            self._show_model_info(self._card_quiet(self.model.value))
            return
        token, picks, cancel = self._guess_token, self._picks, threading.Event()
        self._guess_cancel = cancel
        self._guess = {"state": "running"}
        self._show_model_info(self._card_quiet(self.model.value))
        connect = {
            "returned": lambda out: self._on_guess(token, picks, out),
            "errored": lambda exc: self._on_guess_error(token, exc),
            "finished": lambda: self._on_guess_finished(token),
        }
        self._guess_worker = create_worker(
            _guess_modality, inputs, cancel.is_set, _start_thread=False, _connect=connect
        )
        _start(self._guess_worker)

    def _stop_guess(self, *_: Any) -> None:
        """Cancel the running guess and ignore whatever it still returns."""
        self._guess_token += 1
        self._guess_cancel.set()
        self._guess_worker = None

    @_live
    def _on_guess(self, token: int, picks: int, out: tuple[str, str]) -> None:
        if token != self._guess_token:
            return  # another image was selected meanwhile
        modality, r = out
        chosen, changed = None, False
        if picks == self._picks:  # no model picked by hand since the guess started
            cards = {name: self._card_quiet(name) for name in self._folders}
            chosen = choose_model(modality, cards, self.model.value)
            found = chosen is not None
            if chosen is not None and chosen != self.model.value:
                self._model_guard = True
                try:
                    self.model.value = chosen
                finally:
                    self._model_guard = False
                changed = True
        else:
            found = True  # not looked for: the model was chosen by hand
        self._guess = {"state": "done", "modality": modality, "r": r, "chosen": chosen,
                       "found": found}  # fmt: skip
        if changed:
            self._describe_model()  # as for a model chosen from the list: its defaults too
        else:
            self._show_model_info(self._card_quiet(self.model.value))

    @_live
    def _on_guess_error(self, token: int, exc: BaseException) -> None:
        from .errors import Cancelled

        if token != self._guess_token or isinstance(exc, Cancelled):
            return
        message = str(exc) if str(exc) else type(exc).__name__
        self._guess = {"state": "failed", "message": message}
        self._show_model_info(self._card_quiet(self.model.value))

    def _on_guess_finished(self, token: int) -> None:
        if token == self._guess_token:
            self._guess_worker = None

    def _card_quiet(self, name: str | None) -> Any:
        """The model card of a listed model, or None (no notification)."""
        from .errors import ModelError
        from .models.store import read_card

        folder = self._folders.get(name or "")
        if folder is None:
            return None
        try:
            return read_card(folder)
        except ModelError:
            return None

    def _card(self) -> Any:
        from .errors import ModelError
        from .models.store import read_card

        folder = self._folders.get(self.model.value or "")
        if folder is None:
            return None
        try:
            return read_card(folder)
        except ModelError as exc:
            show_error(str(exc))
            return None

    # ---------------------------------------------------------------- run
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
                inputs["data"], inputs["affine"], header=inputs["header"], path=inputs["path"]
            )
        except ValueError as exc:  # InputError is one
            self._show_failure(layer, str(exc))
            return
        for line in volume.notes:
            show_warning(f"{layer.name}: {line}")
        if self.guessing:  # the run prepares the scan itself: do not do it twice at once
            self._stop_guess()
            self._guess = {"state": "stopped"}
            self._show_model_info(self._card_quiet(self.model.value))
        base = layer.name if index is None else f"{layer.name} volume {index}"
        job = _Job(layer=layer, base=base, model=str(model_name))
        self.job = job
        axis = None if self.axis.value == "model" else self.axis.value
        args = {
            "folder": folder, "axis": axis, "device": self.device.value, "prepare": mode,
            "note": note, "shape": inputs["shape"],
        }  # fmt: skip
        if mode != "none":
            self._set_fit(layer, "checking how the scan fits the model…", "none")
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
        _start(self._worker)

    def _work(self, job: _Job, volume: Any, args: dict) -> tuple:
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
        )
        result = localize(volume, model, options, axis=args["axis"], prepare=args["prepare"])
        session = Session(result)  # scales (percentiles if uncalibrated) here, off the GUI thread
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
        for w in self._tuning:
            w.enabled = not self.exporting

    def _on_finished(self, job: _Job) -> None:
        job.finished = True
        if job is not self.job:
            return
        self.running = False
        self._worker = None
        if self.closed:
            return
        self._show_busy()
        if self.progress.max == 0:  # a busy bar stops being busy
            self.progress.max = 1

    @_live
    def _on_stage(self, name: str) -> None:
        """A stage began: name it on the progress bar (a busy bar while preparing)."""
        if self.job is not None:
            self.job.stage = name
        if name in BUSY_STAGES and self.progress.value == 0:
            self.progress.max = 0
        self.progress.label = name

    @_live
    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = done
        self.progress.label = f"{done}/{total} slices"

    @_live
    def _on_error(self, job: _Job, exc: BaseException) -> None:
        from .errors import Cancelled, VaelocError

        if isinstance(exc, Cancelled):
            during = f" during {job.stage}" if job.stage else ""
            self.progress.max = max(self.progress.max, 1)
            self.progress.value, self.progress.label = 0, f"cancelled{during}"
            if job.reason:
                line = f"run cancelled: {job.reason}; no layers were added"
                self._set_fit(job.layer, line, "warn")
                show_warning(line)
            else:
                self._set_fit(job.layer, f"run cancelled{during}; no layers were changed", "none")
                show_info("localization cancelled; no layers were changed")
        elif isinstance(exc, VaelocError | ValueError | MemoryError):
            self._show_failure(job.layer, str(exc))
        else:
            self._show_failure(job.layer, f"{type(exc).__name__}: {exc}")

    def _show_failure(self, layer: Any, message: str) -> None:
        """A run was refused or failed: the fit line (red) and a notification say why, the
        progress bar says "not localized". The shown result, if any, stays as it was, with
        its layers, sliders and export (the "result" line names its scan and model)."""
        message = " ".join(message.split())
        self._set_fit(layer, f"not localized: {message}", "fail")
        self.progress.max, self.progress.value = 1, 0
        self.progress.label = "not localized"
        show_error(f"localization failed: {message}")

    def _set_fit(self, layer: Any, text: str, level: str, tooltip: str = "") -> None:
        """Show the fit line (for ``layer``: it is hidden while another image is selected)."""
        self._fit = (layer, text, level, tooltip)
        self._show_fit()

    def _show_fit(self) -> None:
        fit = self._fit
        shown = fit is not None and fit[0] is self.image.value
        text, level, tooltip = fit[1:] if fit is not None and shown else ("", "none", "")
        self.fit_info.value = text
        self.fit_info.tooltip = tooltip or FIT_TOOLTIP
        self.fit_info.native.setStyleSheet(FIT_STYLE.get(level, ""))

    @_live
    def _on_done(self, job: _Job, out: tuple) -> None:
        session, model, args = out
        result = session.result
        layer = job.layer
        if job.reason or layer not in self.viewer.layers:
            why = job.reason or f"the scan layer '{layer.name}' was removed"
            show_warning(f"result dropped: {why} during the run; no layers were added")
            self.progress.max, self.progress.value = 1, 0
            self.progress.label = "result dropped"
            return
        try:
            first = self.session is None  # sliders show this model's defaults or user edits
            keep = not first and self._last_run_model == model.path
            old = self.session.settings if keep and self.session is not None else None
            self.session = session
            self._last_run_model = model.path
            self._input_layer, self._shape, self._base = layer, args["shape"], job.base
            if old is not None:
                self.session.settings = old
            elif not first:  # another model: start from its defaults
                self._show_settings(self.session.settings)
            self._read_settings()
            self._update_maps()
            self.apply_settings()
            self.result_info.value = (
                f"{job.base}, model {job.model} ({result.axis} slices, {result.device})"
            )
            self.result_info.tooltip = f"{TOOLTIPS['result']}\n{layer_help(job.base)}"
            text, level = fit_text(result, args["prepare"], args["note"])
            self._set_fit(layer, text, level, fit_tooltip(result))
            if offers_preparation_layers(result):
                put_preparation_layers(self.viewer, result.prepared, layer, args["shape"], job.base)
            self.progress.max = max(self.progress.max, 1)
            self.progress.value = self.progress.max
            self.progress.label = f"done in {result.seconds:.1f} s on {result.device}"
            for line in result.notes:
                if line not in result.volume.notes:  # those were shown at the click
                    show_info(line)
        except Exception as exc:  # never let a display problem crash the viewer
            show_error(f"could not show the result: {type(exc).__name__}: {exc}")

    # ---------------------------------------------------------------- layers
    def _names(self) -> dict[str, str]:
        base = self._base
        return {
            **{suffix: f"{base} {suffix}" for suffix in MAP_LAYERS},
            "combined": f"{base} anomaly map",
            "mask": f"{base} mask",
        }

    def _update_maps(self) -> None:
        s, names = self.session, self._names()
        assert s is not None
        cmaps = {"reconstruction": "gray", "rec_error": "magma", "kl_grad": "viridis"}
        for suffix, key in MAP_LAYERS.items():
            extra = {} if key == "reconstruction" else {"blending": "additive"}
            put_layer(
                self.viewer, "image", names[suffix], s.result.maps[key].reshape(self._shape),
                self._input_layer, suffix, colormap=cmaps[key], visible=False,
                contrast_limits=s.map_range(key), **extra,
            )  # fmt: skip

    @_live
    def _on_timer(self) -> None:
        self.apply_settings()

    def apply_settings(self) -> None:
        """Recompute the combined map and the mask from the cached maps and update the layers."""
        s = self.session
        if s is None or self.closed:
            return
        self._timer.stop()
        names = self._names()
        combined = s.combined()
        if combined is not self._shown_combined or names["combined"] not in self.viewer.layers:
            # only when the map changed: a threshold move must not re-upload the whole volume
            put_layer(
                self.viewer, "image", names["combined"], combined.reshape(self._shape),
                self._input_layer, "combined", colormap="inferno", blending="additive",
                contrast_limits=s.display_range(),
            )  # fmt: skip
            self._shown_combined = combined
        put_layer(
            self.viewer, "labels", names["mask"], s.mask().reshape(self._shape),
            self._input_layer, "mask", opacity=0.6,
        )  # fmt: skip
        self.threshold_info.value = s.threshold_text()

    # ---------------------------------------------------------------- sliders
    def _read_settings(self) -> None:
        if self.session is None:
            return
        st = self.session.settings
        others = {k: v for k, v in st.weights.items() if k not in self.weights}  # no slider
        weights = {**others, **{k: float(w.value) for k, w in self.weights.items() if w.value}}
        scan_normalise = bool(self.scan_normalise.value)
        top = max(4.0, 3.0 * sum(weights.values()), 10.0 if scan_normalise else 0.0)
        if top > self.threshold.max:  # growing the range never moves the value
            self.threshold.max = top
        self.session.settings = st.replace(
            weights=weights,
            scan_normalise=scan_normalise,
            smoothing_mm=float(self.smoothing.value),
            threshold=float(self.threshold.value),
            min_size_mm3=float(self.min_size.value),
        )

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
            self.min_size.value = min(st.min_size_mm3, self.min_size.max)
        finally:
            self._quiet = False

    def _on_slider(self, *_: Any) -> None:
        if self._quiet or self.session is None:
            return
        self._read_settings()
        self._timer.start()  # debounced: a fast drag triggers one update

    def restore_defaults(self, *_: Any) -> None:
        """Set every slider to the model's defaults (the session's model after a run)."""
        if self.session is not None:
            st = self.session.default_settings()
            self.session.settings = st
        else:
            from .combine import CombineSettings

            card = self._card()
            if card is None:
                return
            st = CombineSettings.from_card(card)
        self._show_settings(st)
        if self.session is not None:
            self._read_settings()
            self.apply_settings()

    # ---------------------------------------------------------------- export
    def export(self, path: str | Path, overwrite: bool = False, maps: bool = False) -> list[Path]:
        """Save the mask (and with ``maps`` every map and the scores) in the scan's geometry,
        in this thread.

        Raises OutputExistsError when a file exists and ``overwrite`` is false.
        """
        if self.session is None:
            raise RuntimeError("nothing to export yet: run the localization first")
        return export_session(self.session, path, overwrite=overwrite, maps=maps)

    def _on_export_clicked(self, *_: Any) -> None:
        from .io import scan_stem

        if self.session is None:
            return
        src = self.session.volume.path
        stem = scan_stem(src) if src is not None else self._base or "scan"
        path = ask_export_path(self.native, suggested_path(src, stem))
        if path is not None:
            self.export_in_background(path, maps=bool(self.export_maps.value))

    def export_in_background(self, path: str | Path, maps: bool = False) -> bool:
        """Export the shown result like :meth:`export`, writing in a worker thread: the folder
        is checked and ``confirm`` asked before existing files are replaced (here, in the GUI
        thread); while it writes, the progress bar is busy and Localize, Export and the
        tuning controls are disabled. Failures are one-line notifications. Returns whether an
        export started (``exporting`` is true until it ends)."""
        from napari.qt.threading import create_worker

        from .errors import OutputExistsError, VaelocError

        session = self.session
        if session is None or self.running or self.exporting or self.closed:
            return False
        if self._timer.isActive():  # write what the sliders show
            self.apply_settings()
        try:
            target, existing = export_plan(session, path, maps)
        except (VaelocError, OSError) as exc:
            self._export_failed(exc)
            return False
        if existing and not self.confirm(
            f"{OutputExistsError(existing)}.\n\nReplace the existing files?"
        ):
            return False
        connect = {
            "returned": self._on_exported,
            "errored": self._export_failed,
            "finished": self._on_export_finished,
        }
        self._export_worker = create_worker(
            export_session, session, target, bool(existing), maps,
            _start_thread=False, _connect=connect,
        )  # fmt: skip
        self.exporting = True
        self._show_busy()
        self.progress.value, self.progress.max = 0, 0  # busy: files report no fraction
        self.progress.label = f"exporting to {target.parent}…"
        _start(self._export_worker)
        return True

    @_live
    def _on_exported(self, files: list[Path]) -> None:
        where = Path(files[0]).parent if files else ""
        self.progress.max, self.progress.value = 1, 1
        self.progress.label = f"exported {len(files)} file(s)"
        show_info(f"saved {len(files)} file(s) to {where}")

    @_live
    def _export_failed(self, exc: BaseException) -> None:
        self.progress.max, self.progress.value = 1, 0
        self.progress.label = "export failed"
        show_error(export_failure(exc))

    def _on_export_finished(self) -> None:
        self.exporting = False
        self._export_worker = None
        if not self.closed:
            self._show_busy()

    def _ask_overwrite(self, message: str) -> bool:
        return ask_overwrite(self.native, message)
