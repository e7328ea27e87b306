"""LRP composites: which rule for which layer (Montavon et al. 2019; Kohlbrenner et al. 2020).

An :class:`LRPComposite` is a :class:`coursekit.rules.Composite` with what LRP adds:

* a rule for the **first** layer (the one that sees the pixels: z^B, flat or w^2);
* **position** rules: different rules for lower and upper convolutions (Montavon et al. 2019);
* the model's **normalisation** layer passes relevance unchanged (so the map is in pixel space and
  sums to the logit, instead of being divided by ``std`` as the plain gradient would do), and z^B's
  pixel bounds are converted through it;
* every leaf layer must be covered: an unknown layer raises an error naming it, its type and how
  to give it a rule.

The composites of zennit (Anders et al. 2021) have the same names and rules here, so both libraries
can be compared one to one (``tests/test_crosscheck_lrp.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..registry import Registry
from ..rules import Composite, Pass, Rule
from .canonizers import Sum
from .rules import (
    WINNER_TAKE_ALL,
    AlphaBeta,
    BackwardRule,
    Epsilon,
    Flat,
    Gamma,
    GradientRule,
    Norm,
    Relay,
    ZBox,
    ZPlus,
)

__all__ = ["LRPComposite", "COMPOSITES", "make_composite"]  # + every registered composite
# One decorated factory per composite: its name works in lrp(..., composite="EpsilonPlus"), it is in
# __all__, in the README's method table and in the tests parametrised over COMPOSITES.
COMPOSITES = Registry("LRP composite", exports=__all__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = _CONVS + (nn.Linear,)


def _timm_containers() -> tuple[type, ...]:
    try:
        from timm.layers import SelectAdaptivePool2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return ()
    return (SelectAdaptivePool2d,)


# layers that only move values around: their gradient moves relevance exactly as it should
LRP_PASSTHROUGH: tuple[type, ...] = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.Sequential,
) + _timm_containers()

# rules shared by every LRP composite (zennit's layer_map_base, plus max pooling's choice)
BASE_RULES: dict = {
    (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Hardtanh): Relay(),
    (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d): Relay(),
    (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d): Norm(),
    Sum: Norm(),
    (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d): WINNER_TAKE_ALL,
}


class LRPComposite(Composite):
    """Rules by layer type, a rule for the first layer, and rules by depth.

    Parameters
    ----------
    rules : mapping of type (or tuple of types) -> Rule
        Added to (and overriding) :data:`BASE_RULES`.
    name : str
    first : Rule, optional
        For the first Conv/Linear layer of the model (the one that sees the pixels).
    by_depth : sequence of (float, Rule), optional
        For convolutions after the first: ``[(0.5, Gamma()), (1.0, Epsilon(0.25))]`` gives the lower
        half of them Gamma and the upper half Epsilon (position = index / count).
    names : mapping of layer name -> Rule, optional
        Per-layer overrides (names as in ``model.named_modules()``, after canonizers).
    pixel_relevance : bool
        The normalisation layer (``affine_passthrough``) passes relevance unchanged (True), or keeps
        its plain gradient, which divides the map by ``std`` (False; what zennit on the whole model does).
    """

    def __init__(self, rules: Mapping, name: str = "LRP", first: Rule | None = None,
                 by_depth: Sequence[tuple[float, Rule]] = (), names: Mapping[str, Rule] | None = None,
                 pixel_relevance: bool = True):
        merged = dict(BASE_RULES)
        merged.update(rules)
        super().__init__(merged, name=name, names=names, passthrough=LRP_PASSTHROUGH, require=_LAYERS)
        self.first = first
        self.by_depth = tuple(sorted(by_depth, key=lambda p: p[0]))
        for bound, rule in self.by_depth:
            if not isinstance(rule, Rule) or not 0 < bound <= 1:
                raise ValueError(f"by_depth takes (fraction in (0, 1], Rule) pairs, got ({bound!r}, {rule!r})")
        self.pixel_relevance = bool(pixel_relevance)
        self._assigned: dict[str, Rule] = {}
        self._record: list | None = None
        self._record_passes = True

    def __repr__(self) -> str:
        return f"LRPComposite({self.name!r})"

    def _copy(self, **changes) -> LRPComposite:
        out = LRPComposite({}, self.name, self.first, self.by_depth, self.name_rules, self.pixel_relevance)
        out.type_rules = dict(self.type_rules)
        for k, v in changes.items():
            setattr(out, k, v)
        return out

    def with_rules(self, rules: Mapping | None = None, names: Mapping[str, Rule] | None = None,
                   name: str | None = None) -> LRPComposite:
        """A copy with some rules added or replaced (by type and/or by layer name)."""
        out = self._copy(name=name or self.name, name_rules={**self.name_rules, **(names or {})})
        for key, rule in (rules or {}).items():
            for t in key if isinstance(key, tuple) else (key,):
                out.type_rules[t] = rule
        return out

    def with_first(self, rule: Rule | None) -> LRPComposite:
        """A copy with another rule for the pixel layer (e.g. ``Flat()``, ``WSquare()``, ``ZBox(0, 1)``)."""
        return self._copy(first=rule)

    def recording(self, store: list, passes: bool = True) -> LRPComposite:
        """A copy that appends ``(name, layer type, relevance at output, relevance at input)`` per layer to ``store``.

        ``passes=False`` records only the layers whose rule may change the total: not those that keep
        their plain gradient (max pooling, reshapes; observing them costs a second pass) nor those
        that relay relevance unchanged (ReLU, the normalisation), and sums each tensor in its memory
        order (no channels-last copy; the sums then differ from ``passes=True`` in float rounding only).
        """
        return self._copy(_record=store, _record_passes=passes)

    # -- the plan ---------------------------------------------------------------------------------

    def plan(self, model: nn.Module):
        self._assigned = self._positions(model)
        return super().plan(model)

    def _positions(self, model: nn.Module) -> dict[str, Rule]:
        modules = list(model.named_modules())
        layers = [(n, m) for n, m in modules if isinstance(m, _LAYERS)]
        assigned: dict[str, Rule] = {}
        if not layers:
            return assigned
        norm = next((m for n, m in modules if getattr(type(m), "affine_passthrough", False)
                     and hasattr(m, "mean") and hasattr(m, "std")), None)
        first_name = layers[0][0]
        if self.first is not None:
            rule = self.first
            if isinstance(rule, ZBox) and norm is not None and rule.mean is None:
                rule = rule.through(norm.mean.detach().float().cpu(), norm.std.detach().float().cpu())
            assigned[first_name] = rule
        convs = [n for n, m in layers if isinstance(m, _CONVS) and n != first_name]
        for i, n in enumerate(convs):
            position = (i + 1) / len(convs)
            for bound, rule in self.by_depth:
                if position <= bound + 1e-9:
                    assigned[n] = rule
                    break
        return assigned

    def rule_for(self, name: str, module: nn.Module):
        rule = self.name_rules.get(name) or self._assigned.get(name)
        if rule is None and self.pixel_relevance and getattr(type(module), "affine_passthrough", False):
            rule = Relay()
        if rule is None:
            rule = super().rule_for(name, module)
        if self._record is not None and rule is not None:
            leaf = next(module.children(), None) is None
            if isinstance(rule, Pass) and leaf and self._record_passes and not isinstance(module, (nn.Identity, nn.Dropout)):
                rule = _Recorded(GradientRule(), name, self._record)
            elif isinstance(rule, BackwardRule) and (self._record_passes or not isinstance(rule, Relay)):
                rule = _Recorded(rule, name, self._record, exact=self._record_passes)
        return rule


class _Recorded(BackwardRule):
    """A rule that also writes the relevance sums at its output and inputs (for conservation plots)."""

    def __init__(self, inner: BackwardRule, layer: str, store: list, exact: bool = True):
        self.inner, self.layer, self.store, self.exact = inner, layer, store, exact
        self.name = inner.name

    def _sums(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.exact:  # in the (N, C, H, W) order, whatever the memory layout (conservation tables print these)
            return t.flatten(1).sum(1)
        return t.sum(dim=tuple(range(1, t.dim()))) if t.dim() > 1 else t  # no channels-last copy (lrp's check)

    def backward(self, module, inputs, output, grad_out):
        grads = self.inner.backward(module, inputs, output, grad_out)
        per_sample = [self._sums(g) for g in grads if g is not None]  # (N,) each
        self.store.append((self.layer, type(module).__name__, repr(self.inner), self._sums(grad_out), sum(per_sample)))
        return grads


# ----------------------------------------------------------------------------------------------
# the composites


@COMPOSITES.register(name="LRP-0")
def lrp_zero(bias: bool = True) -> LRPComposite:
    """LRP-0 everywhere (Bach et al. 2015): the gradient x input of a ReLU network, when biases are kept."""
    return LRPComposite({_LAYERS: Epsilon(0.0, bias=bias)}, name="LRP-0")


@COMPOSITES.register(name="LRP-epsilon")
def lrp_epsilon(epsilon: float = 0.25, bias: bool = True, relative: bool = True) -> LRPComposite:
    """LRP-epsilon everywhere; ``relative=True`` scales epsilon by each layer's RMS output."""
    return LRPComposite({_LAYERS: Epsilon(epsilon, bias=bias, relative=relative)}, name=f"LRP-eps({epsilon:g})")


@COMPOSITES.register(name="EpsilonPlus")
def epsilon_plus(epsilon: float = 1e-6, bias: bool = True) -> LRPComposite:
    """z+ (alpha=1, beta=0) for convolutions, epsilon for dense layers (zennit's EpsilonPlus)."""
    return LRPComposite({_CONVS: ZPlus(bias=bias), nn.Linear: Epsilon(epsilon, bias=bias)}, name="EpsilonPlus")


@COMPOSITES.register(name="EpsilonPlusFlat")
def epsilon_plus_flat(epsilon: float = 1e-6, bias: bool = True) -> LRPComposite:
    """EpsilonPlus with the flat rule at the pixel layer (zennit's EpsilonPlusFlat)."""
    return epsilon_plus(epsilon, bias).with_first(Flat())._copy(name="EpsilonPlusFlat")


@COMPOSITES.register(name="EpsilonAlpha2Beta1")
def epsilon_alpha2_beta1(epsilon: float = 1e-6, bias: bool = True) -> LRPComposite:
    """alpha=2, beta=1 for convolutions, epsilon for dense layers (zennit's EpsilonAlpha2Beta1)."""
    return LRPComposite({_CONVS: AlphaBeta(2, 1, bias=bias), nn.Linear: Epsilon(epsilon, bias=bias)},
                        name="EpsilonAlpha2Beta1")


@COMPOSITES.register(name="EpsilonAlpha2Beta1Flat")
def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, bias: bool = True) -> LRPComposite:
    """EpsilonAlpha2Beta1 with the flat rule at the pixel layer (zennit's EpsilonAlpha2Beta1Flat)."""
    return epsilon_alpha2_beta1(epsilon, bias).with_first(Flat())._copy(name="EpsilonAlpha2Beta1Flat")


@COMPOSITES.register(name="EpsilonGammaBox")
def epsilon_gamma_box(low=0.0, high=1.0, gamma: float = 0.25, epsilon: float = 1e-6, bias: bool = True) -> LRPComposite:
    """gamma for convolutions, epsilon for dense layers, z^B at the pixels (zennit's EpsilonGammaBox).

    ``low``/``high`` are pixel bounds ([0, 1]); the composite converts them through the model's
    normalisation.
    """
    return LRPComposite({_CONVS: Gamma(gamma, bias=bias), nn.Linear: Epsilon(epsilon, bias=bias)},
                        name="EpsilonGammaBox", first=ZBox(low, high))


@COMPOSITES.register(name="Montavon2019")
def montavon2019(low=0.0, high=1.0, gamma: float = 0.25, epsilon: float = 0.25, bias: bool = True) -> LRPComposite:
    """The recipe of Montavon et al. (2019, sec. 10.3.3 / their VGG-16 tutorial).

    LRP-0 for the dense layers at the top, LRP-epsilon (``epsilon`` x the layer's RMS output) for
    the upper half of the convolutions, LRP-gamma for the lower half, z^B at the pixels.
    """
    return LRPComposite(
        {nn.Linear: Epsilon(0.0, bias=bias), _CONVS: Epsilon(epsilon, bias=bias, relative=True)},
        name="Montavon 2019", first=ZBox(low, high),
        by_depth=[(0.5, Gamma(gamma, bias=bias)), (1.0, Epsilon(epsilon, bias=bias, relative=True))],
    )


def make_composite(composite) -> LRPComposite:
    """A composite from a name of :data:`COMPOSITES` or an :class:`LRPComposite` (returned as is)."""
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, str):
        return COMPOSITES[composite]()  # an unknown name: a ValueError listing the known ones
    raise ValueError(f"unknown LRP composite {composite!r}; choose one of {list(COMPOSITES)} or pass an LRPComposite")
