"""Small private helpers shared by lecture 1's modules (filters, receptive_fields).

A size given as an int or a pair, the default choice of layers to look at, and drawing one
input image on an axis. The model / image / integer checks live in :mod:`coursekit.inputs`.
"""

from __future__ import annotations

import torch
from torch import nn

from .hooks import get_layer
from .images import to_numpy_image
from .inputs import positive_int


def _pair(value, what: str, minimum: int = 1) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what} must be an int or a pair (h, w), got {value!r}")
        return positive_int(value[0], what, minimum), positive_int(value[1], what, minimum)
    v = positive_int(value, what, minimum)
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
