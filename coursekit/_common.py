"""Small private helpers shared by the lecture modules (filters, receptive_fields, saliency, cam).

Argument checks that raise a readable error showing the bad value, the default choice of
layers to look at, and drawing one input image on an axis.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .hooks import get_layer
from .images import to_numpy_image


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch nn.Module returning logits (e.g. coursekit.load_model(...)), got {type(model).__name__}"
        )


def _check_batch(x, what: str = "x") -> torch.Tensor:
    """A non-empty float batch (N, C, H, W); the error says what to do otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{what} must be a torch.Tensor of shape (N, C, H, W) with values in [0, 1], got {type(x).__name__}; "
            "use coursekit.load_image(...) to turn a picture into one."
        )
    if x.dim() != 4:
        hint = " Add a batch dimension with x[None] or x.unsqueeze(0)." if x.dim() == 3 else ""
        raise ValueError(f"{what} must be a 4-d batch (N, C, H, W), got shape {tuple(x.shape)}.{hint}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must hold float pixels in [0, 1], got dtype {x.dtype}; convert with x.float() / 255.")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch (shape {tuple(x.shape)}); pass at least one image.")
    return x


def _positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _pair(value, what: str, minimum: int = 1) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what} must be an int or a pair (h, w), got {value!r}")
        return _positive_int(value[0], what, minimum), _positive_int(value[1], what, minimum)
    v = _positive_int(value, what, minimum)
    return v, v


def _resolve_layers(model: nn.Module, layers) -> list[str]:
    """Full names of ``layers``; ``None``: the model's early / middle / late layers, else three convolutions."""
    if layers is None:
        named = getattr(model, "layers", None)
        if isinstance(named, dict) and all(k in named for k in ("early", "middle", "late")):
            return [named["early"], named["middle"], named["late"]]
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer; pass layers=[...] explicitly")
        picks = sorted({0, len(convs) // 2, len(convs) - 1})
        return [convs[i] for i in picks]
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"layers must be a layer name, a module, or a non-empty list of them; got {layers!r}")
    return [get_layer(model, layer)[0] for layer in layers]


def _show_image(ax, x: torch.Tensor, title: str = "input") -> None:  # x: (C, H, W)
    img = to_numpy_image(x.detach().cpu().float().clamp(0, 1)) if x.shape[0] in (1, 3) else x[0].cpu().numpy()
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
