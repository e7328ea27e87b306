"""One way to cut a batch into chunks, and one way to run many batches faster on the CPU (plumbing).

Every method that runs a model over more images than fit in memory at once walks the same
``(start, stop)`` pairs and takes the same rows of its per-image arguments, so a batch size means the
same thing everywhere and a last, shorter chunk is handled once. Methods that run many forward passes
of one model on the CPU (lecture 3's deletion curves, lecture 5's sweeps) run them through
:func:`cpu_twin`, a channels-last copy of the model.
"""

from __future__ import annotations

import copy
import pickle

import torch
from torch import nn

from .inputs import positive_int

__all__ = ["batches", "rows", "cpu_twin", "in_layout"]


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


def cpu_twin(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.memory_format | None]:
    """A channels-last copy of ``model`` to run ``x`` through on the CPU, or ``(model, None)``.

    Convolutions run faster channels-last on the CPU (oneDNN): fashion_cnn's forward + backward 1.17-1.2x,
    its deletion curves 1.31x, with the same answers up to float rounding. Call it inside
    :func:`coursekit.guard.guarded`, so the copy is in eval mode with frozen parameters; the user's model is
    not touched. The copy is tried on one image first: a model whose forward needs NCHW memory (``.view`` on
    a convolution's output raises on channels-last tensors) or that cannot be deep-copied is returned as it
    is, with ``None`` for the layout; so is any model off the CPU or without 2-d convolutions.
    """
    if x.device.type != "cpu" or x.dim() != 4 or not any(p.dim() == 4 for p in model.parameters()):
        return model, None
    layout = torch.channels_last
    try:
        twin = copy.deepcopy(model).to(memory_format=layout)
        with torch.no_grad():
            twin(x[:1].contiguous(memory_format=layout))
    except (RuntimeError, TypeError, AttributeError, NotImplementedError, copy.Error, pickle.PicklingError):
        return model, None
    return twin, layout


def in_layout(x: torch.Tensor, layout: torch.memory_format | None) -> torch.Tensor:
    """``x`` in the layout :func:`cpu_twin` chose (None: as it is)."""
    return x if layout is None else x.contiguous(memory_format=layout)
