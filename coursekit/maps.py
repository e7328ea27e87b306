"""From attributions to maps (plumbing): one map per image, and maps on one scale.

An attribution has a value per pixel and channel ``(N, C, H, W)``; a figure, a sanity check or a
deletion curve needs one value per pixel ``(N, H, W)``. :func:`to_map` collapses the channels the
ways the literature does; :func:`rescale_maps` puts every map of a batch on [0, 1] so that maps of
different methods can be compared. Lectures 3 (saliency, CAMs, sanity, faithfulness) and 4 (LRP) use
both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["REDUCTIONS", "to_map", "rescale_maps"]

REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max_abs": lambda a: a.abs().amax(dim=1),  # Simonyan et al. 2014
    "abs_sum": lambda a: a.abs().sum(dim=1),
    "sum": lambda a: a.sum(dim=1),  # signed; the natural choice for gradient x input / IG
    "abs_of_sum": lambda a: a.sum(dim=1).abs(),
    "max": lambda a: a.amax(dim=1),
    "mean": lambda a: a.mean(dim=1),
    "l2": lambda a: a.pow(2).sum(dim=1).sqrt(),
}


def to_map(attribution: torch.Tensor, reduce: str = "max_abs") -> torch.Tensor:
    """Collapse the channels of an attribution ``(N, C, H, W)`` into one map ``(N, H, W)``.

    Parameters
    ----------
    attribution : Tensor (N, C, H, W)
    reduce : str
        ``"max_abs"`` (max over channels of the absolute value; Simonyan et al. 2014),
        ``"abs_sum"``, ``"sum"`` (signed), ``"abs_of_sum"``, ``"max"``, ``"mean"`` or ``"l2"``
        (Euclidean norm over channels).

    Returns
    -------
    Tensor (N, H, W), detached.
    """
    if not isinstance(attribution, torch.Tensor) or attribution.dim() != 4:
        shape = tuple(attribution.shape) if isinstance(attribution, torch.Tensor) else type(attribution).__name__
        raise ValueError(f"to_map expects an attribution of shape (N, C, H, W), got {shape}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce={reduce!r}; choose one of {sorted(REDUCTIONS)}")
    return REDUCTIONS[reduce](attribution.detach())


def rescale_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max rescale every map of (N, H, W) to [0, 1]; a constant map becomes zeros (never NaN)."""
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / span.clamp(min=torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
