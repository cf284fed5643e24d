"""The "Localize anomalies" dock widget: layout and event wiring.

The expensive run happens in a napari thread worker (progress bar, Cancel, GUI stays live); its
cached result lives in a :class:`~napari_vaeloc._widget_controller.Session`, which recombines and
re-thresholds on every (debounced) slider move without touching the network. torch is imported
only inside the workers, through the engine. Export writes in a worker too.

The panel's parts live in their own modules and are mixed in here: the run's life cycle, the
progress bar and the fit line in :mod:`~napari_vaeloc._widget_run`; the model list and the
modality guess in :mod:`~napari_vaeloc._widget_guess`; the sliders and result layers in
:mod:`~napari_vaeloc._widget_tuning`. This module lays the panel out, wires its events, picks the
volume of a 4D scan and starts an export (:mod:`~napari_vaeloc._widget_export` writes it).
"""

from __future__ import annotations

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
from napari.utils.notifications import show_error, show_info

from ._widget_controller import (
    FIT_TOOLTIP,
    MAP_LABELS,
    PREPARE_CHOICES,
    PREPARE_TOOLTIP,
    TOOLTIPS,
    Session,
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
from ._widget_guess import GuessMixin
from ._widget_layers import ROLE_KEY, n_volumes
from ._widget_run import ParentWatch, RunMixin, live, start_worker
from ._widget_tuning import TuningMixin
from .mapnames import AXIS_NAMES, SLIDER_MAPS


def _available_devices(model_folder: str | None = None) -> list[str]:
    """The device choices; in a worker thread at panel start, which also prepares what the
    first run will need: torch, the model shown first (loaded into the shared cache), and
    pandas, which napari imports when the first Labels layer (the mask) is created, a tenth
    of a second or more the GUI thread would otherwise spend at the end of the first run."""
    from .engine import available_devices  # imports torch

    devices = available_devices()
    try:
        import pandas  # noqa: F401
    except ImportError:  # napari then imports what it needs itself
        pass
    if model_folder is not None:
        from .models.store import cached_model

        try:
            cached_model(model_folder)
        except Exception:  # a broken model is reported when a run uses it
            pass
    return devices


def _warm_up(model_folder: str, device: str, batch_size: int) -> None:
    """In a worker after panel start: run the engine once on a small synthetic volume with the
    model shown first (:func:`napari_vaeloc.engine.warm_up`); a failure is left for the run to
    report."""
    from .engine import warm_up
    from .models.store import cached_model

    try:
        warm_up(cached_model(model_folder), device, batch_size)
    except Exception:
        pass
    _warm_line_patterns()


def _warm_line_patterns() -> None:
    """Build vispy's line dash patterns once, off the GUI thread. napari's first Labels layer
    (the mask) makes a line visual for its polygon overlay, and vispy computes its 13 dash
    patterns in Python the first time one is made in a process (about 50 ms, cached after);
    on the GUI thread, during the click, that is most of the panel's longest freeze. The
    patterns are plain numpy arrays, so building them in a worker is safe; where vispy has
    moved them, nothing is done."""
    try:
        from vispy.visuals.line.dash_atlas import DashAtlas

        DashAtlas()
    except Exception:
        pass


class LocalizeWidget(RunMixin, GuessMixin, TuningMixin, Container):
    """Dock widget: pick scan, model, device and axis; run; tune the combination live; export."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session: Session | None = None
        self.batch_size = 64
        self.exporting = False
        self.closed = False
        self.runs = 0  # how many times the network was run (tests check sliders don't run it)
        self.confirm = self._ask_overwrite  # replaceable in tests
        self._export_worker: Any = None
        self._init_run()
        self._init_guess()
        self._init_tuning()
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
        self._parent_watch = ParentWatch(self.close_down)  # the panel's close button
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
        warm_up = create_worker(
            _available_devices, self._folders.get(first or ""), _start_thread=False,
            _connect={"returned": self._set_devices},
        )  # fmt: skip
        start_worker(warm_up)
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
        self.outline = CheckBox(
            text="outline each part (down to a fraction of its peak)", value=False
        )
        self.min_size = FloatSlider(label="min size (mm³)", min=0.0, max=4000.0, step=8.0)
        self.defaults_button = PushButton(text="Restore model defaults")
        self.paper_button = PushButton(text="The paper's method")
        self.export_maps = CheckBox(text="export the maps and scores too", value=False)
        self.export_button = PushButton(text="Export mask…", enabled=False)
        tips = {
            "image": self.image, "volume": self.volume, "model": self.model,
            "model_info": self.model_info, "device": self.device, "axis": self.axis,
            "run": self.run_button, "cancel": self.cancel_button, "progress": self.progress,
            "result": self.result_info, "smoothing": self.smoothing,
            "scan_normalise": self.scan_normalise, "threshold": self.threshold,
            "threshold_info": self.threshold_info, "outline": self.outline,
            "min_size": self.min_size,
            "defaults": self.defaults_button, "paper": self.paper_button,
            "export_maps": self.export_maps, "export": self.export_button,
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
                self.threshold, self.threshold_info, self.outline,
                self.min_size, self.defaults_button, self.paper_button, self.export_maps,
                self.export_button,
            ]
        )  # fmt: skip
        #: controls that change the shown result's settings (fixed while it is exported)
        self._tuning = [
            *self.weights.values(), self.smoothing, self.scan_normalise, self.threshold,
            self.outline, self.min_size, self.defaults_button, self.paper_button,
            self.export_maps,
        ]  # fmt: skip
        self.model.changed.connect(self._on_model_changed)
        self.volume.changed.connect(self._on_volume_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        for w in (
            *self.weights.values(),
            self.smoothing,
            self.scan_normalise,
            self.threshold,
            self.outline,
            self.min_size,
        ):
            w.changed.connect(self._on_slider)
        self.defaults_button.changed.connect(self.restore_defaults)
        self.paper_button.changed.connect(self.paper_settings)
        self.export_button.changed.connect(self._on_export_clicked)

    def _device_choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        avail = self._devices
        if avail is None:
            return [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("mps", "mps")]
        return [(f"auto ({avail[0]})", "auto")] + [
            (d if d in avail else f"{d} (not available)", d) for d in ("cpu", "cuda", "mps")
        ]

    @live
    def _set_devices(self, devices: list[str]) -> None:
        self._devices = list(devices)
        self.device.reset_choices()
        folder = self._folders.get(self.model.value or "")
        if folder is not None and not self.running:  # the first run then starts warm
            from napari.qt.threading import create_worker

            args = (folder, self.device.value, self.batch_size)
            start_worker(create_worker(_warm_up, *args, _start_thread=False))

    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Image) and ROLE_KEY not in layer.metadata and not layer.rgb
        ]

    @live
    def _on_layers_changed(self, *_: Any) -> None:
        self.image.reset_choices()

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

    @live
    def _on_dims(self, *_: Any) -> None:
        if self._volume_layer is not None and not self._volume_by_hand:
            self._sync_volume()

    def _on_volume_changed(self, *_: Any) -> None:
        if not self._quiet:
            self._volume_by_hand = True

    @live
    def _on_image_changed(self, *_: Any) -> None:
        self._sync_volume()
        self._show_fit()
        self._show_threshold_info()
        self._start_guess()

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
        start_worker(self._export_worker)
        return True

    @live
    def _on_exported(self, files: list[Path]) -> None:
        where = Path(files[0]).parent if files else ""
        self.progress.max, self.progress.value = 1, 1
        self.progress.label = f"exported {len(files)} file(s)"
        show_info(f"saved {len(files)} file(s) to {where}")

    @live
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
