"""The one input check and the one target normaliser that every method uses (bottom floor).

* :func:`check_model` — an ``nn.Module``, or a clear ``TypeError``.
* :func:`check_images` — a non-empty float batch ``(N, C, H, W)`` of finite pixels; float64 / float16
  (what ``torch.from_numpy`` gives) is converted to the model's dtype instead of crashing deep inside
  a convolution; a NaN or infinite pixel is an error, never a clean-looking empty map. Given the
  model, the batch is also moved to the model's device, so every method follows the model.
* :func:`target_indices` / :func:`target_scores` — ``target`` is a class index, one index per image,
  or a callable ``output -> (N,)``; the scalar per image that a method explains, maximises or attacks.
* :class:`Unit` — a hidden unit (a channel of a layer, or one neuron of it) as the target of the
  gradient methods (:func:`coursekit.gradients.gradient`), which read the layer's output instead of
  the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .devices import model_device

__all__ = ["check_model", "check_images", "model_dtype", "target_indices", "target_scores", "positive_int",
           "non_negative_int", "number", "int_pair", "check_class_range", "Unit"]


def check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            "model must be a torch nn.Module returning logits (e.g. coursekit.load_model(...)), "
            f"got {type(model).__name__}"
        )
    return model


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first parameter or buffer (float32 when it has none)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in model.buffers():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def check_images(x, what: str = "x", model: nn.Module | None = None, channels: int | None = None,
                 finite: bool = True, pixel_range: bool = False) -> torch.Tensor:
    """A non-empty float batch ``(N, C, H, W)``; the error says what to do otherwise.

    Parameters
    ----------
    x : Tensor
    what : str
        The argument's name, for messages.
    model : nn.Module, optional
        Pixels in another float dtype are converted to the model's dtype (float64 from numpy), and
        pixels on another device are moved to the model's device (a CPU image for a CUDA model).
    channels : int, optional
        The channel count the model expects.
    finite : bool
        Reject NaN and infinite pixels.
    pixel_range : bool
        Reject values outside [0, 1] (attacks clamp to that box, so it must hold the input).

    Returns
    -------
    Tensor (N, C, H, W), possibly converted; on the model's device when ``model`` is given; ``x``
    itself is never modified (a move or conversion is differentiable, so gradients reach ``x``).
    """
    if not isinstance(x, torch.Tensor):
        hint = " (a numpy array: use torch.from_numpy(a).permute(2, 0, 1)[None] or coursekit.load_image)" \
            if isinstance(x, np.ndarray) else "; use coursekit.load_image(...) to turn a picture into one"
        raise TypeError(
            f"{what} must be a torch.Tensor of shape (N, C, H, W) with values in [0, 1], got {type(x).__name__}{hint}"
        )
    if x.dim() != 4:
        hint = " Add a batch dimension with x[None] or x.unsqueeze(0)." if x.dim() == 3 else ""
        raise ValueError(f"{what} must be a 4-d batch (N, C, H, W), got shape {tuple(x.shape)}.{hint}")
    if not x.is_floating_point():
        raise TypeError(
            f"{what} must hold float pixels in [0, 1], got dtype {x.dtype}; convert with x.float() / 255 "
            "or use coursekit.load_image."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch (shape {tuple(x.shape)}); pass at least one image.")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{what} has {x.shape[1]} channel(s) (shape {tuple(x.shape)}) but the model expects {channels}; "
            f"coursekit.load_image(src, channels={channels}) converts an image."
        )
    if finite:
        bad = ~torch.isfinite(x)
        if bad.any():
            n_bad = int(bad.sum())
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{what} contains {n_bad} NaN or infinite value(s) (first at index {first}); a map of such an "
                "input would be meaningless. Check how the image was made (a division by zero?)."
            )
    if pixel_range:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            hint = " (it looks like 0-255 pixels: divide by 255)" if hi > 1.5 else ""
            hint = " (it looks normalised: pass [0, 1] pixels; the model normalises itself)" if lo < -0.01 else hint
            raise ValueError(f"{what} must hold pixels in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")
    if model is not None:
        x = x.to(device=model_device(model), dtype=model_dtype(model))  # x itself when both already fit
    return x


def positive_int(value, what: str, minimum: int = 1) -> int:
    """``value`` as an int when it is an integer >= ``minimum`` (a bool is not), else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def non_negative_int(value, what: str) -> int:
    """``value`` as an int when it is an integer >= 0 (a count of pixels, an index)."""
    return positive_int(value, what, minimum=0)


def number(value, what: str, *, minimum: float | None = None, strict: bool = False, unit: str = "") -> float:
    """``value`` as a float when it is a finite real number (not a bool) >= ``minimum`` (> when ``strict``).

    ``unit`` ends the message ("pixels", "a fraction of the value range"), so a student reads what the
    number means, e.g. ``number(sigma, "sigma", minimum=0, unit="pixels")``.
    """
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not real or not np.isfinite(value):
        raise ValueError(f"{what} must be a finite number{f' of {unit}' if unit else ''}, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{what} must be {bound}{f' ({unit})' if unit else ''}, got {value!r}")
    return float(value)


def int_pair(value, what: str, minimum: int = 1) -> tuple[int, int]:
    """A size given as an int or a pair ``(h, w)`` of integers >= ``minimum``, as a pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what} must be an int or a pair (h, w), got {value!r}")
        return positive_int(value[0], what, minimum), positive_int(value[1], what, minimum)
    v = positive_int(value, what, minimum)
    return v, v


# ----------------------------------------------------------------------------------------------
# targets


@dataclass(frozen=True)
class Unit:
    """A hidden unit as the target of an attribution: what in the input drives this unit?

    The score of image ``n`` is channel ``channel`` of ``layer``'s output, averaged over all
    positions (the unit a channel visualisation maximises), or taken at one ``position``
    ``(y, x)`` (one neuron). Zeiler & Fergus (2014, "Visualizing and understanding convolutional
    networks") project single activations of hidden layers back to the pixels this way, with
    DeconvNet; Springenberg et al. (2015, "Striving for simplicity") do the same with guided
    backpropagation. Accepted by every method built on :func:`coursekit.gradients.gradient`
    (the input gradient, gradient x input, guided backprop, DeconvNet, SmoothGrad, integrated
    gradients); methods that read the model's output (occlusion, deletion curves, CAMs) refuse it.

    Parameters
    ----------
    layer : str
        A layer name, e.g. ``"net.blocks.3"`` (``net.`` optional for coursekit models).
    channel : int
        Channel (or, for a ``(N, K)`` output, unit) index, 0-based.
    position : (int, int), optional
        Row and column in the layer's output; None averages over all positions.
    """

    layer: str
    channel: int
    position: tuple[int, int] | None = None

    def __post_init__(self):
        if not isinstance(self.layer, str) or not self.layer:
            raise TypeError(f"Unit.layer must be a layer name such as 'net.blocks.3', got {self.layer!r}")
        if isinstance(self.channel, bool) or not isinstance(self.channel, (int, np.integer)) or self.channel < 0:
            raise ValueError(f"Unit.channel must be a channel index >= 0, got {self.channel!r}")
        if self.position is not None:
            pos = self.position
            if (not isinstance(pos, (tuple, list)) or len(pos) != 2
                    or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in pos)):
                raise ValueError(f"Unit.position must be None or a pair (y, x) of indices >= 0, got {pos!r}")
            object.__setattr__(self, "position", (int(pos[0]), int(pos[1])))
        object.__setattr__(self, "channel", int(self.channel))

    def scores(self, activation: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` (or ``(N, C)``) output of the layer -> the unit's score ``(N,)``."""
        if activation.dim() < 2 or self.channel >= activation.shape[1]:
            raise ValueError(f"channel {self.channel} out of range: layer {self.layer!r} has output shape "
                             f"{tuple(activation.shape)}")
        a = activation[:, self.channel]  # (N, H, W) or (N,)
        if self.position is None:
            return a.reshape(a.shape[0], -1).mean(dim=1)
        if a.dim() != 3:
            raise ValueError(f"a position needs a spatial output; layer {self.layer!r} has shape {tuple(activation.shape)}")
        y, x = self.position
        if y >= a.shape[1] or x >= a.shape[2]:
            raise ValueError(f"position {self.position} is outside layer {self.layer!r}'s {a.shape[1]} x {a.shape[2]} map")
        return a[:, y, x]


def target_indices(target, n: int, repeats: int = 1, what: str = "target", device=None):
    """Normalise ``target`` for a batch of ``n`` images, each repeated ``repeats`` times (image-major).

    Returns the callable (or :class:`Unit`) unchanged, or a LongTensor ``(n * repeats,)`` of class
    indices on ``device`` (default: where a tensor ``target`` lives, else the CPU).
    """
    if isinstance(target, Unit) or (callable(target) and not isinstance(target, torch.Tensor)):
        return target
    if isinstance(target, bool) or target is None:
        raise TypeError(f"{what} must be a class index or a callable output -> score, got {target!r}")
    try:
        # explicit device: torch.as_tensor would otherwise follow torch.set_default_device
        home = target.device if isinstance(target, torch.Tensor) else torch.device("cpu")
        idx = torch.as_tensor(target, device=home)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{what} must be a class index, one index per image, or a callable; got {target!r}") from err
    if idx.is_floating_point() or idx.dtype == torch.bool or idx.is_complex():
        raise TypeError(f"{what} class indices must be integers, got {target!r}")
    idx = idx.long().reshape(-1)
    if device is not None:
        idx = idx.to(device)
    if idx.numel() == 1:
        return idx.expand(n * repeats)
    if idx.numel() != n:
        raise ValueError(f"got {idx.numel()} {what}s for a batch of {n} images; give one int, or one per image")
    return idx.repeat_interleave(repeats) if repeats > 1 else idx


def check_class_range(indices: torch.Tensor, k: int, what: str = "target") -> torch.Tensor:
    """``indices`` (a LongTensor) unchanged when every one is a class of a ``k``-class model, else a clear ValueError."""
    bad = (indices < 0) | (indices >= k)
    if bool(bad.any()):
        raise ValueError(f"{what} class index {int(indices[bad][0])} out of range: the model has {k} classes (0..{k - 1})")
    return indices


def target_scores(output: torch.Tensor, target) -> torch.Tensor:
    """The scalar per image that a method explains, maximises or attacks.

    Parameters
    ----------
    output : Tensor (N, K)
        Model output (logits).
    target : int, sequence of int, Tensor (N,), or callable ``output -> (N,)`` or scalar
        A class index for every image, one index per image, or any function of the output.

    Returns
    -------
    Tensor (N,)
    """
    n = output.shape[0]
    target = target_indices(target, n, device=output.device)
    if isinstance(target, Unit):
        raise TypeError(f"{target} is a hidden unit: only the gradient methods (input gradient, guided backprop, "
                        "DeconvNet, SmoothGrad, integrated gradients) explain one; this method reads the model's output")
    if callable(target):
        s = target(output)
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"a target function must return a tensor, got {type(s).__name__}")
        if s.dim() == 0:
            s = s.expand(n) if n == 1 else s.reshape(1)
        if s.dim() != 1:
            raise ValueError(f"a target function must return shape (N,) or a scalar, got {tuple(s.shape)}")
        return s
    check_class_range(target, output.shape[1])
    return output.gather(1, target.to(output.device)[:, None])[:, 0]
