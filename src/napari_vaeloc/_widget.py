"""The "Localize anomalies" dock widget: layout and event wiring only.

The expensive run happens in a napari thread worker (progress bar, Cancel, GUI stays live); its
cached result lives in a :class:`~napari_vaeloc._widget_controller.Session`, which recombines and
re-thresholds on every (debounced) slider move without touching the network. torch is imported
only inside the worker, through the engine.
"""

from __future__ import annotations

import threading
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

from ._widget_controller import MAP_LAYERS, Session
from ._widget_export import ask_overwrite, export_session, export_with_dialog
from ._widget_layers import ROLE_KEY, put_layer, scan_inputs
from .mapnames import AXIS_NAMES, SLIDER_MAPS

FOLDER_CHOICE = "__folder__"
DEBOUNCE_MS = 50


def _available_devices() -> list[str]:
    from .engine import available_devices  # imports torch: call in a worker thread

    return available_devices()


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    progress = Signal(int, int)


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
        self._describe_model()

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
        self.run_button = PushButton(text="Localize")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
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
        for label in (self.model_info, self.threshold_info):
            label.native.setWordWrap(True)
        self.extend(
            [
                self.image, self.model, self.model_info, self.device, self.axis,
                self.run_button, self.cancel_button, self.progress,
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
        self._describe_model()

    def _describe_model(self) -> None:
        value = self.model.value
        if value is None or value == FOLDER_CHOICE:
            self.model_info.value = "no model: load one from a folder"
            return
        self._last_model = value
        card = self._card()
        if card is None:
            return
        cal = "calibrated" if card.calibration else "uncalibrated (thresholds relative to the scan)"
        self.model_info.value = f"{card.modality}, {card.axis}; {cal}"
        self.model_info.tooltip = f"{card.provenance.description}\n{card.provenance.sources}"
        if self.session is None:
            self.restore_defaults()

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
        try:
            inputs = scan_inputs(layer)
        except ValueError as exc:
            show_error(str(exc))
            return
        axis = None if self.axis.value == "model" else self.axis.value
        job = {"inputs": inputs, "folder": folder, "axis": axis, "device": self.device.value}
        self._cancel.clear()
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
        )
        result = localize(vol, model, options, axis=job["axis"])
        session = Session(result)  # scales (percentiles if uncalibrated) here, off the GUI thread
        return session, model, layer, inp["shape"]

    def cancel(self, *_: Any) -> None:
        """Ask the running worker to stop at the next batch."""
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

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = done
        self.progress.label = f"{done}/{total} slices"

    def _on_error(self, exc: BaseException) -> None:
        from .errors import Cancelled, VaelocError

        if isinstance(exc, Cancelled):
            self.progress.value, self.progress.label = 0, "cancelled"
            show_info("localization cancelled; no layers were changed")
        elif isinstance(exc, VaelocError | ValueError | MemoryError):
            show_error(f"localization failed: {exc}")
        else:
            show_error(f"localization failed: {type(exc).__name__}: {exc}")

    def _on_done(self, out: tuple) -> None:
        session, model, layer, shape = out
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
