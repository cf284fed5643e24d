"""Deferred maps: a result whose maps are mapped back only when used equals the one mapped back
at once, and the writer holds only the maps it must."""

from __future__ import annotations

import threading
import time

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc.combine import CombineSettings, PostProcessor
from napari_vaeloc.engine import EngineOptions, check_budget, localize
from napari_vaeloc.errors import InputError
from napari_vaeloc.export import write_result
from napari_vaeloc.mapnames import DEFAULT_MAPS
from napari_vaeloc.mapset import MapSet
from tests.helpers import oblique_affine

ALL = (*DEFAULT_MAPS, "restoration")


def test_a_deferred_map_is_made_once_on_use_and_peek_does_not_hold_it():
    calls = []

    def make():
        calls.append(1)
        return np.full((2, 3, 4), float(len(calls)), np.float32)

    maps = MapSet({"a": np.zeros((2, 3, 4), np.float32)})
    maps.defer("b", make)
    assert list(maps) == ["a", "b"] and "b" in maps and len(maps) == 2
    assert maps.is_deferred("b") and maps.held() == ["a"]
    assert maps.peek("b")[0, 0, 0] == 1 and maps.peek("b")[0, 0, 0] == 2  # made each time
    assert maps.is_deferred("b")
    held = maps["b"]
    assert held[0, 0, 0] == 3 and maps["b"] is held and not maps.is_deferred("b")
    assert len(calls) == 3 and maps.held() == ["a", "b"]
    del maps["a"]
    assert list(maps) == ["b"]
    with pytest.raises(KeyError):
        maps.peek("a")


def test_threads_asking_for_one_deferred_map_make_it_once():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return np.ones(3, np.float32)

    maps = MapSet()
    maps.defer("m", slow)
    got = []
    threads = [threading.Thread(target=lambda: got.append(maps["m"])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(g is got[0] for g in got)


@pytest.mark.parametrize("axis", ["axial", "sagittal"])
def test_deferred_maps_equal_maps_mapped_back_at_once(tiny_model, axis):
    from napari_vaeloc.evaluation.synthetic import head_phantom
    from napari_vaeloc.io import Volume

    vol = Volume.from_array(head_phantom((21, 26, 17), seed=5), affine=oblique_affine(1))
    eager = localize(vol, tiny_model, EngineOptions(device="cpu"), axis=axis, maps=ALL)
    lazy = localize(
        vol, tiny_model, EngineOptions(device="cpu", defer_maps=True), axis=axis, maps=ALL
    )
    assert list(lazy.maps) == list(eager.maps)
    assert all(lazy.maps.is_deferred(k) for k in ALL)
    assert lazy.maps.describe("kl_grad") == (vol.shape, np.dtype(np.float32))
    for k in ALL:
        np.testing.assert_array_equal(lazy.maps.peek(k), eager.maps[k])
    np.testing.assert_array_equal(lazy.foreground, eager.foreground)
    half = localize(
        vol,
        tiny_model,
        EngineOptions(device="cpu", defer_maps=True, map_dtype="float16"),
        axis=axis,
        maps=("kl_grad",),
    )
    assert half.maps["kl_grad"].dtype == np.float16


def test_the_budget_counts_only_the_maps_a_deferred_run_holds(tiny_model):
    shape = (300, 300, 200)
    limit = 600_000_000  # 18 M voxels: eight float32 maps (576 MB) do not fit, three do
    eager = EngineOptions(max_bytes=limit)
    with pytest.raises(InputError, match=f"{len(ALL)} float32 maps"):
        check_budget(shape, ALL, eager)
    assert check_budget(shape, ALL, eager.replace(defer_maps=True)) <= limit


def test_a_deferred_result_writes_the_same_files_holding_only_the_combinations_map(
    tiny_model, tmp_path
):
    from napari_vaeloc.evaluation.synthetic import head_phantom
    from napari_vaeloc.io import Volume

    vol = Volume.from_array(head_phantom((20, 24, 18), seed=3), affine=oblique_affine(2))
    settings = CombineSettings(weights={"restoration": 1.0}, smoothing_mm=2.0, threshold=0.5)
    eager = localize(vol, tiny_model, EngineOptions(device="cpu"), maps=ALL)
    lazy = localize(vol, tiny_model, EngineOptions(device="cpu", defer_maps=True), maps=ALL)
    a = write_result(eager, PostProcessor(eager, settings), tmp_path / "a", stem="s")
    b = write_result(lazy, PostProcessor(lazy, settings), tmp_path / "b", stem="s")
    assert sorted(a) == sorted(b) and len(a) == len(ALL) + 3
    for k in a:
        if k == "scores":
            continue
        x, y = nib.load(a[k]), nib.load(b[k])
        np.testing.assert_array_equal(np.asarray(y.dataobj), np.asarray(x.dataobj))
        np.testing.assert_array_equal(y.affine, x.affine)
    # the maps were written one by one; only the one the combination weights stays at full size
    assert lazy.maps.held() == ["restoration"]


def test_a_region_of_a_deferred_map_is_made_alone():
    full = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    wholes, parts = [], []

    def make():
        wholes.append(1)
        return full.copy()

    def region(index):
        parts.append(index)
        return full[index].copy()

    maps = MapSet()
    maps.defer("a", make, full.shape, np.float32, region=region)
    maps.defer("b", make, full.shape, np.float32)  # no region maker
    index = (slice(None), slice(1, 3), slice(0, 6, 2))
    np.testing.assert_array_equal(maps.region("a", index), full[index])
    assert maps.is_deferred("a") and not wholes and parts == [index]
    assert maps.region("b", index) is None and maps.is_deferred("b")
    np.testing.assert_array_equal(maps["a"], full)  # made whole: now a view of the held map
    assert not maps.is_deferred("a") and len(wholes) == 1
    np.testing.assert_array_equal(maps.region("a", index), full[index])
    assert len(parts) == 1
    with pytest.raises(KeyError):
        maps.region("c", index)
