"""Model folders: safetensors + JSON, checksums, architecture checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from napari_vaeloc.errors import ModelError, OutputExistsError
from napari_vaeloc.models.store import (
    CARD_FILE,
    WEIGHTS_FILE,
    load_model,
    read_card,
    save_model,
)
from napari_vaeloc.models.vae import MLPVAE
from tests.helpers import tiny_card


def test_roundtrip_same_outputs(tiny_network, tiny_model_dir):
    m = load_model(tiny_model_dir)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(m.network.encode(x)[0], tiny_network.encode(x)[0])
    card = read_card(tiny_model_dir)
    assert card.architecture.config() == tiny_network.config()
    assert len(card.weights_sha256) == 64
    assert card.provenance.package_version
    assert not m.network.training


def test_mlp_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = MLPVAE(z_dim=5).eval()
    d = save_model(net, tiny_card(net, "mlp"), tmp_path / "mlp")
    m = load_model(d)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(
        m.network.decode(m.network.encode(x)[0]), net.decode(net.encode(x)[0])
    )


def test_save_refuses_to_overwrite(tmp_path, tiny_network):
    d = save_model(tiny_network, tiny_card(tiny_network), tmp_path / "m")
    with pytest.raises(OutputExistsError):
        save_model(tiny_network, tiny_card(tiny_network), d)
    save_model(tiny_network, tiny_card(tiny_network), d, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_tampered_weights_refused(tmp_path, tiny_model_dir):
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    raw = bytearray((d / WEIGHTS_FILE).read_bytes())
    raw[-5] ^= 0xFF
    (d / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="do not match their checksum"):
        load_model(d)


def test_weights_not_fitting_metadata_refused(tmp_path, tiny_model_dir):
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    card = json.loads((d / CARD_FILE).read_text())
    card["architecture"]["z_dim"] = 9
    (d / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match=r"do not fit .*shape mismatch"):
        load_model(d)


def test_broken_folders_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="no model named"):
        load_model("no-such-model")
    d = shutil.copytree(tiny_model_dir, tmp_path / "a")
    (d / CARD_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(d)
    d = shutil.copytree(tiny_model_dir, tmp_path / "b")
    (d / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelError, match="has no weights"):
        load_model(d)
    d = shutil.copytree(tiny_model_dir, tmp_path / "c")
    card = json.loads((d / CARD_FILE).read_text())
    card["architecture"]["type"] = "transformer"
    (d / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="bad architecture"):
        load_model(d)
    d = shutil.copytree(tiny_model_dir, tmp_path / "e")
    (d / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    card = json.loads((d / CARD_FILE).read_text())
    from napari_vaeloc.models.store import sha256_file

    card["weights_sha256"] = sha256_file(d / WEIGHTS_FILE)
    (d / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="cannot read"):
        load_model(d)
