"""One way to cut a batch into chunks (plumbing).

Every method that runs a model over more images than fit in memory at once walks the same
``(start, stop)`` pairs and takes the same rows of its per-image arguments, so a batch size means the
same thing everywhere and a last, shorter chunk is handled once.
"""

from __future__ import annotations

import torch

from .inputs import positive_int

__all__ = ["batches", "rows"]


def batches(total: int, batch_size: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` pairs covering ``range(total)`` in chunks of ``batch_size`` (``None``: one chunk).

    >>> batches(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    total = positive_int(total, "the number of items", minimum=0)
    step = max(total, 1) if batch_size is None else positive_int(batch_size, "batch_size")
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def rows(value, start: int, stop: int):
    """Rows ``start:stop`` of a per-item tensor; anything else (an int class, a callable, None) as is."""
    return value[start:stop] if isinstance(value, torch.Tensor) else value
