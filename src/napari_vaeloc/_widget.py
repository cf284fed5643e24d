"""The "Localize anomalies" dock widget: layout and event wiring only.

The expensive run happens in a napari thread worker (progress bar, Cancel, GUI stays live); its
cached result lives in a :class:`~napari_vaeloc._widget_controller.Session`, which recombines and
re-thresholds on every (debounced) slider move without touching the network. torch is imported
only inside the worker, through the engine.

Before scoring, the engine prepares the scan ("prepare scan": bias-field correction, brain
extraction, registration to the model's template); each stage's name reaches the progress bar
through a queued Qt signal, Cancel works inside every stage, and the fit line under the progress
bar says how the scan fits the model (or why it was refused). When an image is selected, a
second worker guesses its modality and preselects a model of that modality.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
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
)
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, QTimer, Signal

from ._widget_controller import (
    MAP_LAYERS,
    PREPARE_CHOICES,
    PREPARE_TOOLTIP,
    Session,
    choose_model,
    fit_text,
    fit_tooltip,
    guessed_correlation,
    offers_preparation_layers,
    prepare_mode_for,
)
from ._widget_export import ask_overwrite, export_session, export_with_dialog
from ._widget_layers import ROLE_KEY, put_layer, put_preparation_layers, scan_inputs
from .mapnames import AXIS_NAMES, SLIDER_MAPS
from .prepare import too_thin

FOLDER_CHOICE = "__folder__"
DEBOUNCE_MS = 50
#: preparation stages, shown with a busy bar (they report no fraction done)
BUSY_STAGES = ("checking the scan", "bias-field correction", "brain extraction", "registration")
#: colours of the fit line by level
FIT_STYLE = {"ok": "", "none": "", "warn": "color: #e8a33d;", "fail": "color: #f06464;"}


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


class _Relay(QObject):
    """Carries progress and stage names from the worker thread to the GUI thread (queued
    signals)."""

    progress = Signal(int, int)
    stage = Signal(str)


class LocalizeWidget(Container):
    """Dock widget: pick scan, model, device and axis; run; tune the combination live; export."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session: Session | None = None
        self.batch_size = 64
        self.running = False
        self.runs = 0  # how many times the network was run (tests check sliders don't run it)
        self.confirm = self._ask_overwrite  # replaceable in tests
        self._worker: Any = None
        self._cancel = threading.Event()
        self._folders: dict[str, str] = {}  # choice value -> model folder
        self._last_model = ""
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self._relay.stage.connect(self._on_stage)
        self._stage = ""  # the stage the running job is in
        self._picks = 0  # models chosen by hand (a modality guess never overrides one)
        self._guess_worker: Any = None
        self._guess_token = 0  # results of older guesses are ignored
        self._guess_cancel = threading.Event()
        self._guess: dict[str, Any] | None = None  # the modality guess's state for the label
        self._model_text = ""
        self._fit: tuple[Any, str, str, str] | None = None  # layer, text, level, tooltip
        self._run_layer: Any = None  # the input of the running (or last) job
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.apply_settings)
        self._quiet = False
        self._input_layer: Any = None
        self._shape: tuple[int, ...] = ()
        self._last_run_model: Any = None
        self._shown_combined: Any = None  # the combined map the layer shows now
        self._build()
        self.viewer.layers.events.inserted.connect(self.image.reset_choices)
        self.viewer.layers.events.removed.connect(self.image.reset_choices)
        self.image.changed.connect(self._on_image_changed)
        self.native.destroyed.connect(self._stop_guess)
        self._describe_model()
        self._start_guess()

    # ---------------------------------------------------------------- layout
    def _build(self) -> None:
        from napari.qt.threading import create_worker

        from .models.store import bundled_models

        self.image = ComboBox(label="image", choices=self._image_choices, nullable=False)
        for name, folder in bundled_models().items():
            self._folders[name] = str(folder)
        first = next(iter(self._folders), None)
        self.model = ComboBox(
            label="model", choices=self._model_choices, nullable=True, value=first
        )
        self.model_info = Label(label="")
        self._devices: list[str] | None = None  # filled by a worker: importing torch takes ~2 s
        self.device = ComboBox(label="device", choices=self._device_choices, value="auto")
        create_worker(_available_devices, _connect={"returned": self._set_devices})
        self.axis = ComboBox(
            label="axis", choices=[("model's axis", "model"), *[(a, a) for a in AXIS_NAMES]]
        )
        self.prepare = ComboBox(label="prepare scan", choices=PREPARE_CHOICES, value="auto")
        self.prepare.tooltip = PREPARE_TOOLTIP
        self.run_button = PushButton(text="Localize")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.fit_info = Label(label="fit", value="")
        self.fit_info.tooltip = "how the scan fits the model, after a run"
        self.weights = {
            k: FloatSlider(label=f"weight {k}", min=0.0, max=2.0, step=0.05, value=0.0)
            for k in SLIDER_MAPS
        }
        self.smoothing = FloatSlider(label="smoothing (mm)", min=0.0, max=8.0, step=0.25)
        self.scan_normalise = CheckBox(
            text="normalise per scan (threshold in robust z-units)", value=False
        )
        self.scan_normalise.tooltip = (
            "express the combined map relative to this scan's own median and spread, so that "
            "a scan explained worse overall does not light up everywhere"
        )
        self.threshold = FloatSlider(label="threshold", min=0.0, max=4.0, step=0.01, value=1.0)
        self.threshold_info = Label(label="")
        self.min_size = FloatSlider(label="min size (mm³)", min=0.0, max=4000.0, step=8.0)
        self.defaults_button = PushButton(text="Restore model defaults")
        self.export_maps = CheckBox(text="export the maps and scores too", value=False)
        self.export_button = PushButton(text="Export mask…", enabled=False)
        for label in (self.model_info, self.threshold_info, self.fit_info):
            label.native.setWordWrap(True)
        self.extend(
            [
                self.image, self.model, self.model_info, self.device, self.axis, self.prepare,
                self.run_button, self.cancel_button, self.progress, self.fit_info,
                *self.weights.values(), self.smoothing, self.scan_normalise,
                self.threshold, self.threshold_info,
                self.min_size, self.defaults_button, self.export_maps, self.export_button,
            ]
        )  # fmt: skip
        self._model_guard = False
        self.model.changed.connect(self._on_model_changed)
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
        self.model_info.tooltip = f"{card.provenance.description}\n{card.provenance.sources}"
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

    def _on_image_changed(self, *_: Any) -> None:
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
                inputs = scan_inputs(layer)
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
        self._guess_worker.start()

    def _stop_guess(self, *_: Any) -> None:
        """Cancel the running guess and ignore whatever it still returns."""
        self._guess_token += 1
        self._guess_cancel.set()
        self._guess_worker = None

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
        """Start a localization of the chosen layer in a thread worker."""
        from napari.qt.threading import create_worker

        if self.running:
            return
        layer = self.image.value
        folder = self._folders.get(self.model.value or "")
        if layer is None or folder is None:
            show_warning("choose an image layer and a model first")
            return
        from .errors import InputError

        try:
            inputs = scan_inputs(layer)
        except ValueError as exc:
            show_error(str(exc))
            return
        try:
            mode, note = prepare_mode_for(self.prepare.value, inputs["shape"])
        except InputError as exc:
            self._set_fit(layer, f"not localized: {exc}", "fail")
            show_error(f"localization failed: {exc}")
            return
        if self.guessing:  # the run prepares the scan itself: do not do it twice at once
            self._stop_guess()
            self._guess = {"state": "stopped"}
            self._show_model_info(self._card_quiet(self.model.value))
        axis = None if self.axis.value == "model" else self.axis.value
        job = {
            "inputs": inputs, "folder": folder, "axis": axis, "device": self.device.value,
            "prepare": mode, "note": note,
        }  # fmt: skip
        self._cancel.clear()
        self._stage = ""
        self._run_layer = layer
        if mode != "none":
            self._set_fit(layer, "checking how the scan fits the model…", "none")
        self.runs += 1
        connect = {
            "returned": self._on_done,
            "errored": self._on_error,
            "finished": lambda: self._set_running(False),
        }
        self._worker = create_worker(self._work, job, layer, _start_thread=False, _connect=connect)
        self._set_running(True)
        self._worker.start()

    def _work(self, job: dict, layer: Any) -> tuple:
        """Runs in the worker thread: load the model (cached) and score the scan."""
        from .engine import EngineOptions, localize
        from .errors import Cancelled
        from .io import Volume
        from .models.store import cached_model

        model = cached_model(job["folder"])
        inp = job["inputs"]
        vol = Volume.from_array(inp["data"], inp["affine"], header=inp["header"], path=inp["path"])
        if self._cancel.is_set():
            raise Cancelled("localization cancelled")
        options = EngineOptions(
            device=job["device"],
            batch_size=self.batch_size,
            progress=self._relay.progress.emit,
            cancel=self._cancel.is_set,
            stage=self._relay.stage.emit,
        )
        result = localize(vol, model, options, axis=job["axis"], prepare=job["prepare"])
        session = Session(result)  # scales (percentiles if uncalibrated) here, off the GUI thread
        return session, model, layer, inp["shape"], job["prepare"], job["note"]

    def cancel(self, *_: Any) -> None:
        """Ask the running worker to stop: inside the preparation stage it is in, or at the
        next batch of slices."""
        self._cancel.set()
        self.cancel_button.enabled = False

    def _set_running(self, running: bool) -> None:
        self.running = running
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        if running:
            self.progress.value, self.progress.max = 0, 1
            self.progress.label = "loading model"
        else:
            self._worker = None
            if self.progress.max == 0:  # a busy bar stops being busy
                self.progress.max = 1

    def _on_stage(self, name: str) -> None:
        """A stage began: name it on the progress bar (a busy bar while preparing)."""
        self._stage = name
        if name in BUSY_STAGES and self.progress.value == 0:
            self.progress.max = 0
        self.progress.label = name

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = done
        self.progress.label = f"{done}/{total} slices"

    def _on_error(self, exc: BaseException) -> None:
        from .errors import Cancelled, VaelocError

        layer = self._run_layer
        if isinstance(exc, Cancelled):
            during = f" during {self._stage}" if self._stage else ""
            self.progress.max = max(self.progress.max, 1)
            self.progress.value, self.progress.label = 0, f"cancelled{during}"
            self._set_fit(layer, f"run cancelled{during}; no layers were changed", "none")
            show_info("localization cancelled; no layers were changed")
        elif isinstance(exc, VaelocError | ValueError | MemoryError):
            self._set_fit(layer, f"not localized: {exc}", "fail")
            show_error(f"localization failed: {exc}")
        else:
            self._set_fit(layer, f"not localized: {type(exc).__name__}: {exc}", "fail")
            show_error(f"localization failed: {type(exc).__name__}: {exc}")

    def _set_fit(self, layer: Any, text: str, level: str, tooltip: str = "") -> None:
        """Show the fit line (for ``layer``: it is hidden while another image is selected)."""
        self._fit = (layer, text, level, tooltip)
        self._show_fit()

    def _show_fit(self) -> None:
        fit = self._fit
        shown = fit is not None and fit[0] is self.image.value
        text, level, tooltip = fit[1:] if fit is not None and shown else ("", "none", "")
        self.fit_info.value = text
        self.fit_info.tooltip = tooltip or "how the scan fits the model, after a run"
        self.fit_info.native.setStyleSheet(FIT_STYLE.get(level, ""))

    def _on_done(self, out: tuple) -> None:
        session, model, layer, shape, mode, note = out
        result = session.result
        try:
            first = self.session is None  # sliders show this model's defaults or user edits
            keep = not first and self._last_run_model == model.path
            old = self.session.settings if keep and self.session is not None else None
            self.session = session
            self._last_run_model = model.path
            self._input_layer, self._shape = layer, shape
            if old is not None:
                self.session.settings = old
            elif not first:  # another model: start from its defaults
                self._show_settings(self.session.settings)
            self._read_settings()
            self._update_maps()
            self.apply_settings()
            self.export_button.enabled = True
            text, level = fit_text(result, mode, note)
            self._set_fit(layer, text, level, fit_tooltip(result))
            if offers_preparation_layers(result):
                put_preparation_layers(self.viewer, result.prepared, layer, shape, layer.name)
            self.progress.max = max(self.progress.max, 1)
            self.progress.value = self.progress.max
            self.progress.label = f"done in {result.seconds:.1f} s on {result.device}"
            for note in result.notes:
                show_info(note)
        except Exception as exc:  # never let a display problem crash the viewer
            show_error(f"could not show the result: {type(exc).__name__}: {exc}")

    # ---------------------------------------------------------------- layers
    def _names(self) -> dict[str, str]:
        base = self._input_layer.name
        return {
            **{suffix: f"{base} {suffix}" for suffix in MAP_LAYERS},
            "combined": f"{base} anomaly map",
            "mask": f"{base} mask",
        }

    def _update_maps(self) -> None:
        s, names = self.session, self._names()
        assert s is not None
        cmaps = {"reconstruction": "gray", "Rec-Error": "magma", "KL-Grad": "viridis"}
        for suffix, key in MAP_LAYERS.items():
            extra = {} if suffix == "reconstruction" else {"blending": "additive"}
            put_layer(
                self.viewer, "image", names[suffix], s.result.maps[key].reshape(self._shape),
                self._input_layer, suffix, colormap=cmaps[suffix], visible=False,
                contrast_limits=s.map_range(key), **extra,
            )  # fmt: skip

    def apply_settings(self) -> None:
        """Recompute the combined map and the mask from the cached maps and update the layers."""
        s = self.session
        if s is None:
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
        """Save the mask (and with ``maps`` every map and the scores) in the scan's geometry.

        Raises OutputExistsError when a file exists and ``overwrite`` is false.
        """
        if self.session is None:
            raise RuntimeError("nothing to export yet: run the localization first")
        return export_session(self.session, path, overwrite=overwrite, maps=maps)

    def _on_export_clicked(self, *_: Any) -> None:
        if self.session is not None:
            fallback = self._input_layer.name if self._input_layer is not None else "scan"
            export_with_dialog(self, self.session, fallback, self.export_maps.value, self.confirm)

    def _ask_overwrite(self, message: str) -> bool:
        return ask_overwrite(self.native, message)
