"""The typed model card: byte-identical round trips, validation that names the field."""

from __future__ import annotations

import json

import pytest

from napari_vaeloc.errors import ModelError
from napari_vaeloc.models.card import Calibration, ModelCard
from napari_vaeloc.models.store import CARD_FILE, bundled_models, read_card


@pytest.mark.parametrize("name", sorted(bundled_models()))
def test_bundled_cards_round_trip_byte_identical(name, tmp_path):
    src = bundled_models()[name] / CARD_FILE
    card = ModelCard.load(src)
    out = card.save(tmp_path / CARD_FILE)
    assert out.read_bytes() == src.read_bytes()
    again = ModelCard.load(out)
    assert again == card
    assert isinstance(card.calibration, Calibration) and card.calibration.scales
    assert card.defaults.threshold is not None and card.architecture.z_dim > 0


def _bundled_json() -> dict:
    return json.loads((bundled_models()["t2-brain"] / CARD_FILE).read_text())


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.pop("architecture"), "'architecture'"),
        (lambda d: d["architecture"].pop("z_dim"), "'z_dim'"),
        (lambda d: d["defaults"].__setitem__("threshold", "high"), "defaults.threshold"),
        (lambda d: d["calibration"]["scales"].__setitem__("kl_grad", None), "scales.kl_grad"),
        (lambda d: d.__setitem__("axis", "oblique"), "axis"),
        (lambda d: d["normalisation"].__setitem__("method", "minmax"), "normalisation"),
        (lambda d: d.__setitem__("likelihood_log_std", True), "likelihood_log_std"),
        (lambda d: d["defaults"].__setitem__("treshold", 1.0), "treshold"),
        (
            lambda d: d["calibration"].__setitem__("smoothing_fpr", {"3": {"0.001": "x"}}),
            "smoothing_fpr.3.0.001",
        ),
        (
            lambda d: d["calibration"].__setitem__("smoothing_fpr", {"wide": {"0.001": 4.0}}),
            "smoothing_fpr: 'wide'",
        ),
        (
            lambda d: d["calibration"].__setitem__("smoothing_fpr", {"-1": {"0.001": 4.0}}),
            "smoothing_fpr: '-1'",
        ),
        (lambda d: d.__setitem__("modalty", "T2"), "modalty"),
        (lambda d: d["defaults"].__setitem__("fuse_with", "t1-brain-coronal"), "fuse_with"),
        (
            lambda d: d["calibration"].__setitem__("individual_lesions", [[2.0, 1], [0.0, 1]]),
            r"individual_lesions\[1\]",
        ),
        (
            lambda d: d["calibration"].__setitem__("individual_lesions", [[2.0, 0.5]]),
            r"individual_lesions\[0\] must be",
        ),
        (
            lambda d: d["calibration"].__setitem__("individual_lesions", [[2.0, 1, 3]]),
            r"individual_lesions\[0\]",
        ),
    ],
)
def test_missing_or_mistyped_field_refused_with_its_name(edit, field, tmp_path):
    d = _bundled_json()
    edit(d)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / CARD_FILE).write_text(json.dumps(d))
    with pytest.raises(ModelError, match=field.replace(".", r"\.").replace("'", "'")) as err:
        read_card(folder)
    assert str(folder / CARD_FILE) in str(err.value)  # the message says which file


def test_newer_format_refused():
    d = _bundled_json()
    d["format_version"] = 99
    with pytest.raises(ModelError, match="newer napari-vaeloc"):
        ModelCard.from_dict(d)


def test_the_card_module_is_the_only_place_that_knows_the_keys():
    """Outside the card module, nothing in the package reads model.json by string key."""
    from pathlib import Path

    import napari_vaeloc

    root = Path(napari_vaeloc.__file__).parent
    keys = (
        '"combined_fpr"', '"kl_grad_scale"', '["scales"]', '.get("scales"', '["defaults"]',
        '"threshold_fpr"', '["training"]', ".calibration[", ".defaults[", '"fuse_with"'
    )  # fmt: skip
    offenders = [
        f"{p.relative_to(root)}: {k}"
        for p in root.rglob("*.py")
        if p.name != "card.py"
        for k in keys
        if k in p.read_text()
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("name", ["t1-brain", "t2-brain"])
def test_bundled_defaults_have_levels_at_every_smoothing_of_the_panel(name):
    """The bundled defaults' false-positive tables cover every whole millimetre of the panel's
    smoothing slider (``vaeloc calibrate`` reads them from the held-out brains), each a
    stricter threshold for a stricter rate."""
    from napari_vaeloc.training.operating_point import LEVEL_SMOOTHINGS_MM

    if name not in bundled_models():
        pytest.skip(f"{name} is not installed")
    cal = read_card(bundled_models()[name]).calibration
    assert sorted(cal.smoothing_tables()) == list(LEVEL_SMOOTHINGS_MM)
    for sigma in LEVEL_SMOOTHINGS_MM:
        pairs = cal.fpr_table(sigma)
        assert [f for _, f in pairs] == sorted((f for _, f in pairs), reverse=True), sigma
        assert len(pairs) == len(cal.fpr_table()), sigma
