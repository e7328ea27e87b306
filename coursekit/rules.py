"""The rules engine: modified backward passes, one small rule object per layer type (bottom floor).

In the spirit of zennit (Anders et al. 2021, "Software for dataset-wide XAI"):

* a :class:`Rule` changes how the gradient passes one module on the way back;
* a :class:`Composite` maps layer types (or layer names) to rules and attaches them to a model
  for the length of a ``with`` block; every leaf layer must be covered, or the composite raises an
  error naming the layer and its type (never a silent plain gradient);
* a :class:`Canonizer` rewrites a model reversibly (e.g. merges batch-norm into the convolution
  before it) so that rules see the layers they were written for.

Guided backpropagation and DeconvNet are the first two composites (:data:`GUIDED`,
:data:`DECONVNET`); the LRP rules of lecture 4 are rules of the same engine.

Attaching rules is what the gradient path does when given ``composite=``::

    from coursekit.gradients import gradient
    g = gradient(model, x, target, composite=GUIDED)        # guided backprop, (N, C, H, W)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ._reference import reference

__all__ = [
    "Rule", "Pass", "OutputGradientRule", "BackwardRule", "GuidedRelu", "DeconvRelu",
    "Composite", "Canonizer", "UncoveredLayerError", "LINEAR_TYPES", "GUIDED", "DECONVNET",
]


class UncoveredLayerError(TypeError):
    """A layer of the model has no rule in the composite."""


# ----------------------------------------------------------------------------------------------
# rules


class Rule:
    """How the backward pass crosses one module. Subclasses override :meth:`attach`.

    ``attach(module)`` registers whatever hooks the rule needs and returns their handles; the
    composite removes them. A rule holds no per-call state, so one object serves every module.
    """

    name = "rule"

    def attach(self, module: nn.Module) -> list:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Pass(Rule):
    """The plain gradient (the module's own backward): for layers a method leaves alone."""

    name = "gradient"

    def attach(self, module):
        return []


class OutputGradientRule(Rule):
    """Transform the gradient arriving at the module's output, then let its own backward run.

    ``grad_in = own_backward(transform(grad_out))``; the cheapest kind of rule (one hook on the
    output tensor), enough for guided backpropagation.
    """

    def transform(self, grad_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attach(self, module):
        def hook(mod, inputs, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self.transform)

        return [module.register_forward_hook(hook)]


_in_rule_backward = threading.local()  # a rule's backward may run its module again: no hooks then


class _Rerouted(torch.autograd.Function):
    """Forward: the module's output (already computed). Backward: the rule's gradients w.r.t. the inputs."""

    @staticmethod
    def forward(ctx, rule, module, output, *inputs):
        ctx.rule, ctx.module = rule, module
        ctx.save_for_backward(output, *inputs)
        return output.clone()

    @staticmethod
    def backward(ctx, grad_out):
        output, *inputs = ctx.saved_tensors
        inputs = tuple(t.detach().requires_grad_(True) for t in inputs)
        _in_rule_backward.depth = getattr(_in_rule_backward, "depth", 0) + 1
        try:
            with torch.enable_grad():
                grads = ctx.rule.backward(ctx.module, inputs, output, grad_out)
        finally:
            _in_rule_backward.depth -= 1
        return (None, None, None, *grads)


class BackwardRule(Rule):
    """Replace the module's backward by :meth:`backward` (the general kind of rule, e.g. LRP).

    A forward hook swaps the module's output for an identical tensor whose backward calls
    ``self.backward(module, inputs, output, grad_out)`` and returns one gradient per tensor input.
    ``inputs`` arrive as fresh leaves that require grad, so a rule may re-run the module (or a
    modified copy of it) and call ``torch.autograd.grad`` — the "gradient trick" of zennit; the
    rule's hooks are off while it does.
    """

    def backward(self, module: nn.Module, inputs: tuple, output: torch.Tensor, grad_out: torch.Tensor) -> tuple:
        raise NotImplementedError

    def attach(self, module):
        rule = self

        def hook(mod, inputs, output):
            if getattr(_in_rule_backward, "depth", 0):
                return None  # the rule itself is re-running the module inside its backward
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{type(mod).__name__} returns {type(output).__name__}; a backward rule needs a tensor")
            tensors = tuple(t for t in inputs if isinstance(t, torch.Tensor))
            if not any(t.requires_grad for t in tensors):
                return None  # nothing flows back through here
            return _Rerouted.apply(rule, mod, output.detach(), *tensors)

        return [module.register_forward_hook(hook)]


def _relu_upper(module: nn.Module) -> float | None:
    if isinstance(module, nn.ReLU6):
        return 6.0
    if isinstance(module, nn.Hardtanh) and module.min_val == 0:
        return float(module.max_val)
    return None


class GuidedRelu(OutputGradientRule):
    """Guided backpropagation (Springenberg et al. 2015): ``grad_in = relu(grad_out) * [forward mask]``.

    The module's own backward multiplies by its forward mask (``[z > 0]`` for ReLU,
    ``[0 < z < 6]`` for ReLU6), so keeping the positive part of the gradient at its output is all
    the rule has to do: one clamp per activation.
    """

    name = "guided"

    def transform(self, grad_out):
        return grad_out.clamp(min=0)


class _DeconvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, upper):
        return z.clamp(min=0) if upper is None else z.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out.clamp(min=0), None


class DeconvRelu(Rule):
    """DeconvNet (Zeiler & Fergus 2014): ``grad_in = relu(grad_out)``, the forward mask ignored."""

    name = "deconvnet"

    def attach(self, module):
        upper = _relu_upper(module)

        def hook(mod, inputs, output):
            return _DeconvFn.apply(inputs[0], upper)  # recompute the cheap clamp with the rule's backward

        return [module.register_forward_hook(hook)]


# ----------------------------------------------------------------------------------------------
# composites


def _timm_linear_types() -> tuple[type, ...]:
    try:  # timm's layers that are linear maps or containers of covered layers
        from timm.layers import SelectAdaptivePool2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return ()
    return (SelectAdaptivePool2d,)


# Layers that are affine maps (or reshape / select values): their plain gradient is what every
# gradient-based method uses, so composites for ReLU-style rules pass them through.
LINEAR_TYPES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, nn.Bilinear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout2d, nn.ZeroPad2d, nn.ConstantPad2d,
) + _timm_linear_types()


class Composite:
    """Rules by layer type (and by layer name) for one method.

    Parameters
    ----------
    rules : mapping of type (or tuple of types) -> Rule
        Matched along each module's class hierarchy: the most specific type wins.
    name : str
        The method, for messages.
    names : mapping of layer name -> Rule, optional
        Per-layer overrides (e.g. a different rule for the first convolution).
    passthrough : tuple of types
        Types that keep their plain gradient (:class:`Pass`).
    require : tuple of types
        At least one module of these types must be present (else the method would silently be a
        plain gradient).
    first : Rule, optional
        A rule for the first computing layer (LRP's z^B at the pixels).
    """

    def __init__(self, rules: Mapping, name: str = "composite", names: Mapping[str, Rule] | None = None,
                 passthrough: Sequence[type] = LINEAR_TYPES, require: Sequence[type] = ()):
        self.type_rules: dict[type, Rule] = {}
        for key, rule in rules.items():
            for t in key if isinstance(key, tuple) else (key,):
                if not isinstance(t, type) or not isinstance(rule, Rule):
                    raise TypeError(f"a composite maps layer types to Rule objects, got {key!r}: {rule!r}")
                self.type_rules[t] = rule
        self.name_rules = dict(names or {})
        self.passthrough = tuple(passthrough)
        self.require = tuple(require)
        self.name = name

    def __repr__(self) -> str:
        rules = ", ".join(f"{t.__name__}: {r!r}" for t, r in self.type_rules.items())
        return f"Composite({self.name!r}, {{{rules}}})"

    def with_rules(self, rules: Mapping | None = None, names: Mapping[str, Rule] | None = None,
                   name: str | None = None) -> Composite:
        """A copy with some rules added or replaced (by type and/or by layer name)."""
        out = Composite({}, name or self.name, {**self.name_rules, **(names or {})}, self.passthrough, self.require)
        out.type_rules = dict(self.type_rules)
        for key, rule in (rules or {}).items():
            for t in key if isinstance(key, tuple) else (key,):
                out.type_rules[t] = rule
        return out

    def rule_for(self, name: str, module: nn.Module) -> Rule | None:
        """The rule of one module: by name, else by the most specific type, else None."""
        if name in self.name_rules:
            return self.name_rules[name]
        for t in type(module).__mro__:
            if t in self.type_rules:
                return self.type_rules[t]
            if t in self.passthrough:
                return Pass()
        return None

    def plan(self, model: nn.Module) -> list[tuple[str, nn.Module, Rule]]:
        """(name, module, rule) for every module that gets a rule; raises for an uncovered leaf layer."""
        plan = []
        for name, module in model.named_modules():
            rule = self.rule_for(name, module)
            if rule is None:
                if next(module.children(), None) is None and not _is_parameter_free_wrapper(module):
                    raise UncoveredLayerError(
                        f"layer {name!r} ({type(module).__name__}) has no rule in the {self.name} composite. "
                        f"Assign one with composite.with_rules({{{type(module).__name__}: rule}}) or "
                        f"composite.with_rules(names={{{name!r}: rule}}); use coursekit.rules.Pass() to keep "
                        "its plain gradient."
                    )
                continue
            if not isinstance(rule, Pass):
                plan.append((name, module, rule))
        if self.require and not any(isinstance(m, self.require) for _, m, _ in plan):
            kinds = " or ".join(f"nn.{t.__name__}" for t in self.require)
            raise ValueError(
                f"{type(model).__name__} has no {kinds} modules, so the {self.name} rule cannot be attached "
                "(activations called as functions, e.g. F.relu or torch.relu inside forward, are invisible to "
                f"hooks). Rewrite the model with nn.{self.require[0].__name__} modules, or use a plain gradient."
            )
        return plan

    @reference
    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Attach the rules for the block; every handle removed in ``finally``."""
        handles = []
        try:
            for _name, module, rule in self.plan(model):
                handles += rule.attach(module)
            yield model
        finally:
            for h in handles:
                h.remove()


def _is_parameter_free_wrapper(module: nn.Module) -> bool:
    # a layer that declares itself an affine, parameter-free map (coursekit.models.Normalize does)
    return bool(getattr(type(module), "affine_passthrough", False))


# ----------------------------------------------------------------------------------------------
# canonizers


class Canonizer:
    """Rewrites a model reversibly so that rules see the layers they were written for.

    Subclasses implement :meth:`apply`, which changes the model and returns a function that undoes
    exactly that change. Use through :meth:`applied` (undone in ``finally``); the gradient path also
    runs canonizers inside :func:`coursekit.guard.guarded` with ``structure=True``, which restores
    every module, parameter and buffer even if an undo function is wrong.

    ``writes_tensors`` (class attribute, True unless a subclass says otherwise): whether :meth:`apply`
    may write into the model's existing parameter or buffer tensors. A canonizer that only swaps
    modules (all of coursekit's) sets it False, and the guard then skips copying every tensor's value.
    """

    writes_tensors: bool = True

    def apply(self, model: nn.Module) -> Callable[[], None]:
        raise NotImplementedError

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        undo = self.apply(model)
        try:
            yield model
        finally:
            undo()


_RECTIFIERS = (nn.ReLU, nn.ReLU6)
GUIDED = Composite({_RECTIFIERS: GuidedRelu()}, name="guided backprop", require=_RECTIFIERS)
DECONVNET = Composite({_RECTIFIERS: DeconvRelu()}, name="DeconvNet", require=_RECTIFIERS)
