"""Where computations run: a device resolver, and the device a model lives on (bottom floor).

* :func:`resolve_device` — ``"auto"`` becomes CUDA when PyTorch sees a GPU, else Apple's MPS when it
  works, else the CPU; an explicit device passes through; a misspelt one is a clear ``ValueError``.
* :func:`model_device` — the device of a model's first parameter or buffer. Every coursekit method
  computes there: the one input check (:func:`coursekit.inputs.check_images`) moves the input to it,
  and every tensor a method makes (baselines, noise, masks, kernels) is made there.

Random numbers are drawn on the CPU from a seeded CPU ``torch.Generator`` and then moved
(:func:`cpu_generator`), so a seeded run draws the same numbers on every device.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import nn

__all__ = ["resolve_device", "model_device", "cpu_generator"]

ENV_VAR = "COURSEKIT_DEVICE"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


@functools.lru_cache(maxsize=1)
def _mps_works() -> bool:
    """A small convolution, forward and backward, on MPS: some macOS / PyTorch pairs fail at it."""
    try:
        x = torch.rand(1, 3, 16, 16, device="mps", requires_grad=True)  # (1, 3, 16, 16)
        w = torch.rand(4, 3, 3, 3, device="mps")  # (4, 3, 3, 3)
        torch.nn.functional.conv2d(x, w, padding=1).relu().sum().backward()
        return bool(torch.isfinite(x.grad).all())
    except (RuntimeError, NotImplementedError) as err:  # reported, then the CPU is used
        warnings.warn(f"Apple's MPS device is present but a test convolution failed on it ({err}); "
                      "using the CPU. Pass device='mps' to force it.", RuntimeWarning, stacklevel=3)
        return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device to load a model on.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"``: the device named by the environment variable ``COURSEKIT_DEVICE`` when it is
        set (``make test`` sets ``cpu`` for the notebooks it compares with their committed, CPU-made
        outputs), else ``cuda`` when ``torch.cuda.is_available()``, else ``mps`` when
        ``torch.backends.mps`` is available and a small convolution runs forward and backward there,
        else ``cpu``. Anything else (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a
        ``torch.device``) is returned as a ``torch.device`` unchanged: asking for a device the
        machine lacks fails where the model is moved, with PyTorch's message.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        For a string that names no device (e.g. ``"gpu"``); the message lists what works.
    TypeError
        For anything that is neither a string nor a ``torch.device``.
    """
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', a device string such as 'cpu' or 'cuda', or a torch.device; "
                        f"got {type(device).__name__} {device!r}")
    if device.strip().lower() == "auto":
        pinned = os.environ.get(ENV_VAR, "").strip()
        if pinned and pinned.lower() != "auto":  # e.g. COURSEKIT_DEVICE=cpu: the committed outputs' device
            return resolve_device(pinned)
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available() and _mps_works():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use 'auto' (a GPU when there is one), 'cpu', 'cuda', "
                         f"'cuda:1' or 'mps' ({err})") from err


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU when it has neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``: draw with ``device="cpu"``, then ``.to(device)``.

    Drawing on the CPU gives the same numbers whichever device the model is on (CUDA's generator
    draws other numbers from the same seed).
    """
    return torch.Generator(device="cpu").manual_seed(int(seed))
