"""Tuning the shown result in the "Localize anomalies" panel: sliders → settings → layers.

The sliders edit the settings of the shown :class:`~napari_vaeloc._widget_controller.Session`;
a (debounced) move recombines and re-thresholds the cached maps without running the network,
and updates the result layers (the combined map only when it changed).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QTimer

from ._widget_controller import MAP_LAYERS
from ._widget_layers import put_layer
from ._widget_run import live

#: how long the sliders wait for the next move before updating the layers (ms)
DEBOUNCE_MS = 50


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
        self._base = ""  # the shown result's layer-name prefix
        self._shape: tuple[int, ...] = ()
        self._last_run_model: Any = None
        self._shown_combined: Any = None  # the combined map the layer shows now

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
        for key, slider in self.weights.items():  # a map the run did not compute has no say
            slider.enabled = key in s.result.maps
        cmaps = {"reconstruction": "gray", "rec_error": "magma", "kl_grad": "viridis"}
        for suffix, key in MAP_LAYERS.items():
            extra = {} if key == "reconstruction" else {"blending": "additive"}
            put_layer(
                self.viewer, "image", names[suffix], s.result.maps[key].reshape(self._shape),
                self._input_layer, suffix, colormap=cmaps[key], visible=False,
                contrast_limits=s.map_range(key), **extra,
            )  # fmt: skip

    @live
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
        computed = self.session.result.maps
        moved = {k: float(w.value) for k, w in self.weights.items() if w.value and k in computed}
        weights = {**others, **moved}
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
            self.apply_settings()
