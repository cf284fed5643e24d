"""The maps of a localization, each either held at full size or *deferred*: kept as the small
model-space stack it is mapped back from, and put on the scan's grid only when it is used.

A 600x600x400 scan's nine float32 maps take 5 GiB on its grid and under 0.1 GiB as (N, S, S)
model-space stacks, so a front that writes the maps one by one
(:func:`napari_vaeloc.export.write_result`) or shows only some of them (the napari panel) keeps
only those at full size. The compute core; no napari or Qt here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, MutableMapping

import numpy as np

#: makes one full-size map: () -> (X, Y, Z) array on the scan's grid
MapMaker = Callable[[], np.ndarray]
#: makes part of a map: (one slice per axis, start:stop:step) -> ``full_map[index]``
RegionMaker = Callable[[tuple[slice, ...]], np.ndarray]


class MapSet(MutableMapping):
    """name -> (X, Y, Z) map on the scan's grid, like a dict; a map added with :meth:`defer`
    is made by its function on first access (``maps[name]``), then held like any other.
    :meth:`peek` makes a deferred map without holding it (to write it and let it go).

    Thread-safe: two threads asking for the same deferred map make it once.
    """

    def __init__(self, arrays: dict[str, np.ndarray] | None = None) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._makers: dict[str, MapMaker] = {}
        self._order: list[str] = []
        self._lock = threading.RLock()
        self._making: dict[str, threading.Lock] = {}
        self._described: dict[str, tuple[tuple[int, ...] | None, np.dtype | None]] = {}
        self._regions: dict[str, RegionMaker] = {}
        for k, v in (arrays or {}).items():
            self[k] = v

    def defer(
        self,
        name: str,
        make: MapMaker,
        shape: tuple[int, ...] | None = None,
        dtype: np.dtype | str | None = None,
        region: RegionMaker | None = None,
    ) -> None:
        """Add ``name``, made by ``make()`` when it is first used (replacing any held map);
        ``shape`` and ``dtype``: what it will be (for :meth:`describe`; default: unknown);
        ``region``: makes a part of it alone (for :meth:`region`; default: none)."""
        with self._lock:
            self._arrays.pop(name, None)
            self._makers[name] = make
            if region is None:
                self._regions.pop(name, None)
            else:
                self._regions[name] = region
            self._described[name] = (
                None if shape is None else tuple(int(n) for n in shape),
                None if dtype is None else np.dtype(dtype),
            )
            if name not in self._order:
                self._order.append(name)

    def describe(self, name: str) -> tuple[tuple[int, ...] | None, np.dtype | None]:
        """(shape, dtype) of a map without making it (None for what a deferred map was not
        told).

        Raises:
            KeyError: no such map.
        """
        with self._lock:
            if name in self._arrays:
                return self._arrays[name].shape, self._arrays[name].dtype
            self._makers[name]  # KeyError for an unknown name
            return self._described.get(name, (None, None))

    def region(self, name: str, index: tuple[slice, ...]) -> np.ndarray | None:
        """``maps[name][index]`` (``index``: one slice per axis) without making a deferred map
        whole: a view of the held map, a deferred map's part made by its region maker (not
        held), or None for a deferred map without one.

        Raises:
            KeyError: no such map.
        """
        with self._lock:
            if name in self._arrays:
                return self._arrays[name][index]
            self._makers[name]  # KeyError for an unknown name
            make = self._regions.get(name)
        return None if make is None else make(index)

    def is_deferred(self, name: str) -> bool:
        """True while ``name`` is not held at full size (it is made on its next use)."""
        return name in self._makers

    def held(self) -> list[str]:
        """The names held at full size, in order."""
        return [k for k in self._order if k in self._arrays]

    def peek(self, name: str) -> np.ndarray:
        """The map ``name``: the held array, or a deferred map made now and *not* held (each
        call makes it again).

        Raises:
            KeyError: no such map.
        """
        with self._lock:
            if name in self._arrays:
                return self._arrays[name]
            make = self._makers[name]
        return make()

    def __getitem__(self, name: str) -> np.ndarray:
        with self._lock:
            if name in self._arrays:
                return self._arrays[name]
            making = self._making.setdefault(name, threading.Lock())
        with making:  # one thread makes it; the others wait for it, not for other maps
            with self._lock:
                if name in self._arrays:
                    return self._arrays[name]
                make = self._makers[name]
            array = make()
            with self._lock:
                if self._makers.get(name) is make:  # not replaced or removed meanwhile
                    del self._makers[name]
                    self._regions.pop(name, None)
                    self._arrays[name] = array
                self._making.pop(name, None)
            return array

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        with self._lock:
            self._makers.pop(name, None)
            self._regions.pop(name, None)
            self._arrays[name] = value
            if name not in self._order:
                self._order.append(name)

    def __delitem__(self, name: str) -> None:
        with self._lock:
            if name not in self._arrays and name not in self._makers:
                raise KeyError(name)
            self._arrays.pop(name, None)
            self._makers.pop(name, None)
            self._regions.pop(name, None)
            self._order.remove(name)

    def __contains__(self, name: object) -> bool:
        return name in self._arrays or name in self._makers

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def __repr__(self) -> str:
        parts = [f"{k}{'' if k in self._arrays else ' (deferred)'}" for k in self._order]
        return f"MapSet({', '.join(parts)})"
