"""Running LRP and looking at it: heatmaps, conservation layer by layer (lecture 4).

:func:`lrp` is the input gradient of the shared gradient path (:func:`coursekit.gradients.gradient`)
with an LRP composite attached and the relevance at the top set to the explained logit, so the
map sums to that logit when every layer conserves. Because it is an ordinary attribution method
``(model, x, target) -> (N, C, H, W)``, ``coursekit.gradients.smooth(lrp)`` is SmoothGrad of LRP
and :mod:`coursekit.faithfulness` / :mod:`coursekit.sanity` take it like any other method.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..gradients import gradient
from ..guard import user_stacklevel
from ..inputs import check_images, check_model, target_indices, target_scores
from ..rules import Canonizer
from .canonizers import (
    EfficientNetCanonizer,
    MergeBatchNorm,
    MobileNetV2Canonizer,
    ResNetCanonizer,
    VGGCanonizer,
    unexplained,
)
from .composites import LRPComposite, make_composite
from .rules import ZBox

__all__ = ["lrp", "default_canonizers", "Conservation", "conservation", "plot_conservation", "plot_relevance",
           "relevance_limit", "ConservationWarning", "UncanonizedWarning"]


class ConservationWarning(UserWarning):
    """Relevance was created or lost outside every LRP rule (more than 5 % of the logit): the map is not LRP's."""


class UncanonizedWarning(UserWarning):
    """LRP ran on a model with batch-norms or residual blocks that no canonizer rewrote."""


def _torchvision_types() -> dict:
    try:
        from torchvision.models import VGG, MobileNetV2, ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return {}
    return {ResNet: ResNetCanonizer, MobileNetV2: MobileNetV2Canonizer, VGG: VGGCanonizer}


def default_canonizers(model: nn.Module) -> list[Canonizer]:
    """The canonizers a model needs ("auto").

    :class:`EfficientNetCanonizer` for timm EfficientNets; :class:`ResNetCanonizer`,
    :class:`MobileNetV2Canonizer` and (when it has batch-norms) :class:`VGGCanonizer` for torchvision's
    networks; for any other model with batch-norms :class:`MergeBatchNorm` (Conv/Linear + batch-norm
    in an ``nn.Sequential``); else none.
    """
    modules = list(model.modules())
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    out: list[Canonizer] = []
    if any(type(m).__name__ == "EfficientNet" for m in modules):
        out.append(EfficientNetCanonizer())
    for kind, canonizer in _torchvision_types().items():
        if any(isinstance(m, kind) for m in modules) and (canonizer is not VGGCanonizer or has_bn):
            out.append(canonizer())
    if not out and has_bn:
        out.append(MergeBatchNorm())
    return out


class _Explainable(Canonizer):
    """Runs after the other canonizers: refuses (``refuse=True``) or warns about what LRP would explain wrongly."""

    writes_tensors = False

    def __init__(self, refuse: bool):
        self.refuse = refuse

    def apply(self, model):
        check_explainable(model, self.refuse)
        return lambda: None


def check_explainable(model: nn.Module, refuse: bool = True) -> None:
    """Raise a ValueError (``refuse``) or warn (:class:`UncanonizedWarning`) when LRP would explain ``model`` wrongly.

    The modules listed by :func:`coursekit.lrp.canonizers.unexplained` (batch-norm not merged,
    residual blocks with their addition) are named, with what to do.
    """
    found = unexplained(model)
    if not found:
        return
    more = f" and {len(found) - 6} more" if len(found) > 6 else ""
    why = (f"{', '.join(found[:6])}{more}. A batch-norm left in place is skipped (relevance passes it unchanged, "
           "its scale and shift ignored) and a residual addition copies relevance into both paths, so the map would "
           "not sum to the logit (torchvision's resnet18: about 255x).")
    if refuse:
        raise ValueError(
            f"LRP cannot explain {type(model).__name__} correctly: no canonizer rewrote {why} coursekit has canonizers "
            "for torchvision's ResNet, VGG-BN and MobileNetV2 and timm's EfficientNet-Lite (canonizers='auto' picks "
            "them); for another network write a coursekit.rules.Canonizer (see coursekit.lrp.canonizers) and pass "
            "canonizers=[...], or pass canonizers=None to get the uncanonized map anyway, with a warning.")
    warnings.warn(f"this LRP map of {type(model).__name__} is not a correct explanation: the canonizers given left "
                  f"{why} Use canonizers='auto' or a canonizer for these blocks.", UncanonizedWarning,
                  stacklevel=user_stacklevel())


def _canonizers(model, canonizers, warn: bool = True):
    """The canonizers to run, followed by the check that they left nothing LRP explains wrongly."""
    if canonizers == "auto":
        chosen, refuse = default_canonizers(model), True
    elif canonizers is None:
        chosen, refuse = [], False
    else:
        chosen = list(canonizers) if isinstance(canonizers, (list, tuple)) else [canonizers]
        refuse = False
        for c in chosen:
            if not isinstance(c, Canonizer):
                raise TypeError(f"canonizers must be Canonizer objects (or 'auto' / None), got {type(c).__name__}")
    if not unexplained(model):  # canonizers never add batch-norms or residual blocks
        return chosen
    if not chosen:
        if refuse or warn:
            check_explainable(model, refuse)
        return chosen
    return chosen + [_Explainable(refuse)] if refuse or warn else chosen


def _check_box(composite, x: torch.Tensor) -> None:
    """z^B assumes every pixel within its bounds: refuse 0-255 pixels or an already normalised input."""
    rules = [getattr(composite, "first", None), *getattr(composite, "name_rules", {}).values()]
    for rule in rules:
        if not isinstance(rule, ZBox):
            continue
        low, high = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in (rule.low, rule.high))
        low, high = (b.view(1, -1, 1, 1) if b.dim() == 1 else b for b in (low, high))
        tol = 1e-6
        if bool((x < low - tol).any()) or bool((x > high + tol).any()):
            lo, hi = float(x.min()), float(x.max())
            hint = " It looks like 0-255 pixels: divide by 255." if hi > 1.5 and float(high.max()) <= 1 else ""
            hint = " It looks normalised: pass [0, 1] pixels, the model normalises itself." \
                if lo < -0.01 and float(low.min()) >= 0 else hint
            raise ValueError(
                f"the {composite.name} composite's z^B rule {rule!r} assumes every pixel of x within its bounds, got "
                f"values in [{lo:.3g}, {hi:.3g}]; its map would be meaningless.{hint} For other bounds give them in "
                "the units of x, e.g. lrp.epsilon_gamma_box(low=..., high=...), or use a composite without z^B "
                "(e.g. 'EpsilonPlusFlat').")


def _relevance_target(target, n: int, start: str, seen: list | None = None):
    """A target callable whose gradient at the output is the logit itself (``start='logit'``) or 1.

    ``seen`` (a list) receives the relevance put on the explained output, (N,) per batch.
    """
    if start not in ("logit", "one"):
        raise ValueError(f"start must be 'logit' (relevance at the top = the logit) or 'one', got {start!r}")
    targets = target_indices(target, n)

    def score(output):  # (N, K) -> (N,)
        s = target_scores(output, targets)
        if seen is not None:
            seen.append(s.detach() if start == "logit" else torch.ones_like(s))
        return s * s.detach() if start == "logit" else s  # d(s * s0)/ds = s0: the top relevance is the logit

    return score


def _check_accounting(model: nn.Module, relevance: torch.Tensor, top: torch.Tensor, store: list) -> None:
    """Warn when relevance was created or lost *outside* every rule (a hidden ``+``, an unruled scaling).

    Every LRP rule reports the relevance sums at its output and inputs (``store``); what a rule absorbs
    (biases, epsilon) is accounted for there. What is left, ``pixels - top - sum(in - out)``, comes from
    operations inside ``forward`` that no rule sees: ``x + f(x)`` copies relevance into both paths,
    ``F.batch_norm`` or ``2 * x`` scales it. A map's sum alone cannot tell this from biases that push
    against the class (fashion_cnn's LRP-0 maps sum to up to 1.3 x the logit, correctly).
    """
    sums = relevance.flatten(1).sum(1)  # (N,)
    top = top.to(sums)
    absorbed = sum((out.to(sums) - inp.to(sums) for *_, out, inp in store), torch.zeros_like(sums))  # (N,)
    hidden = sums - top + absorbed  # (N,) relevance from outside the rules
    bad = (hidden.abs() > 0.05 * top.abs()) & (top != 0) & torch.isfinite(hidden)
    if bool(bad.any()):
        idx = bad.nonzero()[:, 0].tolist()
        shown = ", ".join(f"image {i}: map sum {float(sums[i] / top[i]):.3g} x the logit, {float(hidden[i] / top[i]):+.3g} "
                          "from outside the rules" for i in idx[:3]) + (" ..." if len(idx) > 3 else "")
        warnings.warn(
            f"this LRP map of {type(model).__name__} is not a correct explanation ({shown}): relevance was created or "
            "lost where no LRP rule sees it, typically a residual addition (x + f(x)) or a normalisation computed inside "
            "forward(). Rewrite those blocks with a canonizer (see coursekit.lrp.canonizers); lrp.conservation shows "
            "the sums layer by layer.", ConservationWarning, stacklevel=user_stacklevel())


def lrp(model: nn.Module, x: torch.Tensor, target, composite="EpsilonGammaBox", canonizers="auto",
        *, start: str = "logit") -> torch.Tensor:
    """Layer-wise relevance propagation (Bach et al. 2015) of ``target`` for a batch.

    Parameters
    ----------
    model : nn.Module
        Pixels ``(N, C, H, W)`` in [0, 1] -> logits. Left exactly as it was (the shared guard).
    x : Tensor (N, C, H, W)
    target : int, sequence of int, Tensor (N,), or callable ``output -> (N,)``
    composite : str or LRPComposite
        Rules per layer: a name from :data:`coursekit.lrp.COMPOSITES` or a composite object.
    canonizers : "auto", None or sequence of Canonizer
        "auto": :func:`default_canonizers` (torchvision ResNet, VGG-BN, MobileNetV2, timm
        EfficientNet, batch-norm in an ``nn.Sequential``); a ValueError naming the modules when
        batch-norms or residual blocks are left that no canonizer rewrote. None or a list: those
        canonizers only, and an :class:`UncanonizedWarning` when such modules are left.
        They are undone afterwards, even on error.
    start : {"logit", "one"}
        Relevance put on the explained output: its value (the map then sums to the logit when
        relevance is conserved) or 1 (a fraction of the logit).

    Returns
    -------
    Tensor (N, C, H, W): relevance per pixel and channel, detached.

    Raises
    ------
    ValueError
        Also when the composite's z^B rule does not hold ``x`` (0-255 pixels, a normalised input).

    Warns
    -----
    UncanonizedWarning
        Explicit ``canonizers`` left batch-norms or residual blocks LRP explains wrongly.
    ConservationWarning
        Relevance was created or lost outside every rule (more than 5 % of the logit): an addition
        or scaling inside ``forward`` that no canonizer rewrote. (The map's sum itself may leave
        [0, 1] correctly: biases that push against the class leave more than the logit.)
    """
    check_model(model)
    x = check_images(x, model=model)
    composite = make_composite(composite)
    _check_box(composite, x)
    seen: list = []
    score = _relevance_target(target, x.shape[0], start, seen)
    store: list = []
    account = isinstance(composite, LRPComposite) and not callable(target_indices(target, x.shape[0]))
    relevance = gradient(model, x, score, composite=composite.recording(store, passes=False) if account else composite,
                         canonizers=_canonizers(model, canonizers), what="LRP")
    if account:
        _check_accounting(model, relevance, torch.cat(seen), store)
    return relevance



@dataclass
class Conservation:
    """Relevance sums layer by layer, from the logit down to the pixels.

    Attributes
    ----------
    layers : list of str
        Each layer in the order the backward pass crosses it (the top layer first), ``"pixels"`` last.
    kinds : list of str
        Layer type and rule.
    sums : ndarray (L, N)
        Total relevance at each layer's **output** (everything that arrived there from above; the
        first row is the logit), and the pixel map's sum last.
    in_branch : list of bool
        The layer sits inside a residual branch: its output carries only that branch's share.
    """

    layers: list[str]
    kinds: list[str]
    sums: np.ndarray
    in_branch: list[bool]

    @property
    def ratios(self) -> np.ndarray:
        """``sums / sums[0]`` (L, N): 1 everywhere when every layer conserves relevance."""
        return self.sums / self.sums[:1]

    def main_path(self) -> Conservation:
        """Only the layers outside residual branches: the relevance of the whole cut through the network."""
        keep = [i for i, b in enumerate(self.in_branch) if not b]
        return Conservation([self.layers[i] for i in keep], [self.kinds[i] for i in keep], self.sums[keep],
                            [False] * len(keep))

    def table(self, image: int = 0, decimals: int = 6) -> str:
        """One line per layer: name, type/rule, relevance sum at its output and the ratio to the logit."""
        header = "layer (relevance at its output)"
        width = max(len(header), *(len(n) for n in self.layers))
        kind_width = max(len("type / rule"), *(len(k) for k in self.kinds))
        rows = [f"{header:{width}s}  {'type / rule':{kind_width}s} {'sum':>12s} {'ratio':>10s}"]
        for name, kind, s, r in zip(self.layers, self.kinds, self.sums[:, image], self.ratios[:, image]):
            rows.append(f"{name:{width}s}  {kind:{kind_width}s} {s:12.{max(decimals - 2, 1)}f} {r:10.{decimals}f}")
        return "\n".join(rows)


def conservation(model: nn.Module, x: torch.Tensor, target, composite="EpsilonGammaBox", canonizers="auto") -> Conservation:
    """Sum of relevance at the output of every layer on the way down (one LRP pass that writes them out).

    Parameters
    ----------
    model, x, target, composite, canonizers
        As in :func:`lrp`, except that an explicit ``canonizers`` (None, a list) gives no warning:
        the sums show what is wrong.

    Returns
    -------
    Conservation
    """
    check_model(model)
    x = check_images(x, model=model)
    store: list = []
    comp = make_composite(composite)
    _check_box(comp, x)
    comp = comp.recording(store)
    score = _relevance_target(target, x.shape[0], "logit")
    chosen = _canonizers(model, canonizers, warn=False)  # "auto" refuses; the sums show the rest
    pixels = gradient(model, x, score, composite=comp, canonizers=chosen, what="LRP")
    if not store:
        raise RuntimeError("no layer reported relevance; is the composite attached to this model?")
    layers = [name for name, *_ in store] + ["pixels"]
    kinds = [f"{kind} / {rule}" for _, kind, rule, _, _ in store] + ["input map"]
    sums = [out for *_, out, _ in store] + [pixels.flatten(1).sum(1)]
    in_branch = [".branch." in f".{name}." or ".shortcut." in f".{name}." for name in layers]
    return Conservation(layers, kinds, torch.stack([s.float().cpu() for s in sums]).numpy(), in_branch)


# distinct colour, marker and line style for each line of a conservation plot (lines that overlap stay visible)
_LINE_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")]


def plot_conservation(results: dict, image: int = 0, ax=None, title: str = "Relevance conservation, logit -> pixels",
                      main_path: bool = True, labels: bool | None = None, depth: bool = False, align: bool = False,
                      max_labels: int = 40):
    """Relevance sum / logit per layer for one or more :class:`Conservation` results (one line each).

    Each line has its own colour, marker and line style, so lines that lie on top of each other stay
    visible; the legend sits outside the axes, to the right.

    Parameters
    ----------
    results : dict of label -> Conservation
    image : int
        Which image of the batch.
    ax : matplotlib Axes, optional
    main_path : bool
        Leave out layers inside residual branches (their sums are one branch's share only).
    labels : bool, optional
        Layer names on the x axis (default: when there are at most 30 points and ``depth`` is False).
    depth : bool
        x = position from the logit (0) to the pixels (1), so results with different layer counts
        (a model with and without a canonizer) line up.
    align : bool
        x = the layer's place in the union of all results' layer names (:func:`_merged_layer_order`),
        so a layer that several results share sits at the same x in each, and the x axis names the
        layers (every k-th name when there are more than ``max_labels``). Use it to compare a model
        with and without a canonizer layer by layer.
    max_labels : int
        Most layer names written on the x axis with ``align``.
    """
    import matplotlib.pyplot as plt

    if not isinstance(results, dict) or not results:
        raise ValueError(f"results must be a non-empty dict {{label: Conservation}}, got {type(results).__name__}")
    if depth and align:
        raise ValueError("choose depth=True or align=True, not both")
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.8))
    shown = {}
    for label, res in results.items():
        if not isinstance(res, Conservation):
            raise TypeError(f"results[{label!r}] must be a Conservation (from lrp.conservation), got {type(res).__name__}")
        res = res.main_path() if main_path else res
        keep = [i for i, kind in enumerate(res.kinds) if "Relay" not in kind]  # element-wise layers repeat the value
        shown[label] = (res, keep)
    order = _merged_layer_order([[res.layers[i] for i in keep] for res, keep in shown.values()])
    position = {name: p for p, name in enumerate(order)}
    for k, (label, (res, keep)) in enumerate(shown.items()):
        if align:
            xs = np.array([position[res.layers[i]] for i in keep])
        else:
            xs = np.linspace(0, 1, len(keep)) if depth else np.arange(len(keep))
        marker, style = _LINE_STYLES[k % len(_LINE_STYLES)]
        ax.plot(xs, res.ratios[keep, image], marker=marker, ms=5, ls=style, lw=1.6, mfc="none" if k % 2 else None,
                label=f"{label} ({len(keep)} layers)" if depth or align else label)
        show = labels if labels is not None else (len(keep) <= 30 and not depth)
        if align:
            step = max(1, -(-len(order) // max(1, int(max_labels))))  # every step-th name, at most max_labels
            ticks = np.arange(0, len(order), step)
            ax.set_xticks(ticks, [order[t] for t in ticks], rotation=60, ha="right", fontsize=7)
            ax.set_xlabel("relevance at the output of layer ... (logit on the left, pixel map on the right"
                          + (f"; one name every {step} layers)" if step > 1 else ")"))
        elif show:
            ax.set_xticks(xs, [res.layers[i] for i in keep], rotation=45, ha="right")
            ax.set_xlabel("relevance at the output of layer ... (logit on the left, pixel map on the right)")
        elif depth:
            ax.set_xlabel("position from the logit (0) to the pixels (1)")
        else:
            ax.set_xlabel(f"{len(keep)} layers, from the logit (left) to the pixels (right)")
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_ylabel("relevance sum / logit")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def _merged_layer_order(sequences: list[list[str]]) -> list[str]:
    """The union of several ordered lists of layer names, each list's order kept.

    A name missing from the lists seen so far goes right after the name that precedes it in its own
    list (at the start when none does), so shared layers get one place:
    ``[["a", "b", "d"], ["a", "c", "d"]] -> ["a", "b", "c", "d"]``.
    """
    order: list[str] = []
    for names in sequences:
        after = -1  # index in ``order`` of the last name of this list placed so far
        for name in names:
            if name in order:
                after = order.index(name)
            else:
                order.insert(after + 1, name)
                after += 1
    return order


def relevance_limit(*maps: torch.Tensor, percentile: float = 99.5) -> float:
    """One colour-scale end for several relevance maps, so they can share a colour bar.

    Parameters
    ----------
    *maps : Tensor (C, H, W) or (H, W)
        Relevance maps; a 3-D map is summed over channels first, as :func:`plot_relevance` does.
    percentile : float in (0, 100]
        The scale ends at this percentile of |relevance| over all the maps' pixels.

    Returns
    -------
    float > 0 (1e-12 when every map is zero)
    """
    if not maps:
        raise ValueError("relevance_limit needs at least one map")
    if not 0 < float(percentile) <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    values = []
    for i, m in enumerate(maps):
        if not isinstance(m, torch.Tensor) or m.dim() not in (2, 3):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"map {i} must be a tensor (C, H, W) or (H, W), got {shape}")
        r = m.detach().float().cpu()
        values.append((r.sum(0) if r.dim() == 3 else r).abs().flatten())  # (H*W,)
    return float(np.percentile(torch.cat(values).numpy(), percentile)) or 1e-12


def plot_relevance(image, relevance: torch.Tensor, ax=None, title: str | None = None, colorbar: bool = True,
                   percentile: float = 99.5, alpha_image: float = 0.0, limit: float | None = None):
    """A signed relevance map (summed over channels) on a zero-centred diverging colour map.

    Red is relevance for the explained class, blue against it, white zero; the colour scale runs
    from ``-limit`` to ``+limit``.

    Parameters
    ----------
    image : Tensor (C, H, W) in [0, 1] or None
        Drawn in grey underneath when ``alpha_image`` > 0.
    relevance : Tensor (C, H, W) or (H, W)
    ax : matplotlib Axes, optional
    title : str, optional
    colorbar : bool
        Draw a colour bar next to the map (pointed ends mark values beyond the scale).
    percentile : float
        Without ``limit``: the colour scale ends at this percentile of |relevance| (a few extreme
        pixels would wash it out).
    alpha_image : float in [0, 1)
    limit : float > 0, optional
        The colour-scale end, e.g. from :func:`relevance_limit` so that several maps share one scale.

    Returns
    -------
    matplotlib Axes (its image, ``ax.get_images()[-1]``, is the mappable for a shared colour bar)
    """
    import matplotlib.pyplot as plt

    r = relevance.detach().float().cpu()
    if r.dim() == 3:
        r = r.sum(0)  # (H, W)
    if r.dim() != 2:
        raise ValueError(f"relevance must be (C, H, W) or (H, W), got shape {tuple(relevance.shape)}")
    r = r.numpy()
    if limit is None:
        lim = float(np.percentile(np.abs(r), percentile)) or 1e-12
    elif isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0:
        lim = float(limit)
    else:
        raise ValueError(f"limit must be a positive number (the colour-scale end) or None, got {limit!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(3.2, 3.2))
    if image is not None and alpha_image > 0:
        grey = image.detach().float().cpu().mean(0).numpy()
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
    im = ax.imshow(r, cmap="bwr", vmin=-lim, vmax=lim, alpha=1 - alpha_image if alpha_image else 1.0)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    if colorbar:
        extend = "both" if float(np.abs(r).max()) > lim else "neither"
        plt.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="relevance", extend=extend)
    return ax
