"""Allocation of the large host arrays the engine and the post-processing create.

numpy asks Linux for transparent huge pages for every large array (``madvise``); where the
kernel then compacts memory on the first touch, a new 34 MiB array costs about 70 ms to fill
on the 2-core development machine, against about 12 ms for the same array from torch's CPU
allocator. A localization creates one such array per map and the post-processing a few more,
so the maps and the volumes derived from them are allocated here, through torch, and handed
out as ordinary numpy arrays (they share the tensor's memory and keep it alive).
"""

from __future__ import annotations

import numpy as np


def host_array(shape: tuple[int, ...], dtype=np.float32, zero: bool = False) -> np.ndarray:
    """A new C-contiguous numpy array of ``shape`` and ``dtype`` (any dtype torch has: float32,
    float16, float64, bool, uint8, ...), uninitialised unless ``zero``, allocated by torch.

    Raises:
        TypeError: a dtype torch cannot hold.
    """
    import torch

    tdtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    make = torch.zeros if zero else torch.empty
    return make(tuple(int(s) for s in shape), dtype=tdtype).numpy()
