"""Counting host syncs: the tensor methods that make the host wait for the device (on a GPU)
or copy a value to the host, counted at the Python level (on the CPU too)."""
from __future__ import annotations

import collections
import contextlib

import torch

SYNCING_METHODS = ("__bool__", "item", "tolist", "cpu", "numpy", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def counted_host_syncs():
    """Yields a Counter of those method calls made while the context is open. A compiled
    graph's own kernels are not Python calls: what it counts is the host side of the loop."""
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING_METHODS}

    def counting(name, original):
        def method(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
