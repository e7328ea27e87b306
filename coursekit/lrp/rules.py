"""LRP rules: parameters of one generic rule of the shared rules engine (lecture 4).

Layer-wise relevance propagation (Bach et al. 2015; overview: Montavon et al. 2019) sends the
score back through the network layer by layer, keeping the total ("conservation"). For a layer
``z_j = sum_i x_i w_ij + b_j`` every rule has the same shape::

    R_i = sum_k  c_k * x_i^(k) * sum_j w_ij^(k) * R_j / stab(z_j^*)

with a few *terms* ``k`` (a modified input ``x^(k)`` times modified weights ``w^(k)``), a
denominator ``z^*`` that sums the terms' outputs, and a coefficient ``c_k``. The zennit "gradient
trick" (Anders et al. 2021) computes the inner sum as a vector-Jacobian product:
``sum_j w_ij s_j`` is the gradient of ``z(x)`` w.r.t. ``x`` with output gradient ``s = R / z^*``,
so one rule object works for dense, convolutional, pooling and sum layers.

=====================  ===========================================  =========================
rule                   terms (input, weights, bias)                 used for
=====================  ===========================================  =========================
``Epsilon(eps)``       (x, w, b); ``Epsilon(0)`` is LRP-0           top / middle layers
``Gamma(gamma)``       (x+, w + gamma w+) ... (Andeol et al. 2021)  lower convolutions
``AlphaBeta(a, b)``    alpha (x+w+ + x-w-) - beta (x+w- + x-w+)     convolutions (a - b = 1)
``ZPlus()``            alpha=1, beta=0                              convolutions
``ZBox(low, high)``    (x, w) - (low, w+) - (high, w-)              the pixel layer
``Flat()``             (1, 1): spread evenly over the receptive field  the pixel layer
``WSquare()``          (1, w^2)                                     the pixel layer
``Norm()``             (x, the layer itself)                        average pooling, sums
``ProportionalPool()`` (x, average pooling in place of max)         max pooling
``Relay()``            relevance unchanged                          ReLU, ReLU6, normalisation
``GradientRule()``     the layer's plain gradient, observable       tests, comparisons
=====================  ===========================================  =========================

Max pooling's winner-take-all rule is its plain gradient (``coursekit.rules.Pass``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._reference import reference
from ..registry import Registry
from ..rules import BackwardRule, Pass

__all__ = ["Term", "Group", "LRPRule", "RULES", "stabilize"]  # + every registered rule
# One decorated class per LRP backward rule: in __all__, the README's method table and the tests
# parametrised over RULES.
RULES = Registry("LRP rule", exports=__all__)


@reference  # exercise set 04_lrp blocks it while the student's rule runs
def stabilize(z: torch.Tensor, epsilon: float, relative: bool = False) -> torch.Tensor:
    """``z + epsilon * sign(z)`` with sign(0) = +1 (zennit's convention); ``epsilon=0``: zeros -> inf (R/z = 0).

    ``relative=True`` scales ``epsilon`` by each sample's root-mean-square of ``z`` (Montavon et al.
    2019 use ``0.25 * std`` of the layer's outputs).
    """
    if epsilon == 0:
        return z.masked_fill(z == 0, float("inf"))
    eps = epsilon * z.pow(2).mean(dim=tuple(range(1, z.dim())), keepdim=True).sqrt() if relative \
        else z.new_tensor(epsilon)
    # + eps where z >= 0 (-0.0 + 0.0 is +0.0: sign(-0) = +1 too), else + (-eps), which is z - eps bit for bit
    # (IEEE); float-only passes: torch.where with a boolean mask is several times slower on the CPU
    return z + torch.copysign(eps, z + 0.0)


# ----------------------------------------------------------------------------------------------
# modifiers: what a term does to the input, the weights and the bias


def _same(t):
    return t


def _pos(t):
    return t.clamp(min=0)


def _neg(t):
    return t.clamp(max=0)


def _ones(t):
    return torch.ones_like(t)


def _square(t):
    return t * t


def _gamma(gamma: float, part: Callable) -> Callable:
    def modify(t):
        return t + gamma * part(t)

    return modify


@dataclass(frozen=True)
class Term:
    """One term of a rule: ``x -> input(x)``, ``w -> weight(w)``, ``b -> bias(b)`` (None: no bias).

    ``sign`` enters the denominator and the redistributed relevance (z^B subtracts its bound terms).
    ``input`` may return a fixed bound (ZBox) and ``op`` replaces the layer's own map (max -> average).
    """

    input: Callable = _same
    weight: Callable = _same
    bias: Callable | None = _same
    sign: float = 1.0
    op: Callable | None = None  # (module, x) -> z for parameter-free layers computed differently

    @property
    def unmodified(self) -> bool:
        return self.input is _same and self.weight is _same and self.bias is _same and self.op is None


@dataclass(frozen=True)
class Group:
    """Terms that share a denominator, scaled by ``scale``; ``where`` masks by the sign of the layer's output."""

    terms: tuple[Term, ...]
    scale: float = 1.0
    where: str = "all"  # "all" | "positive" | "negative"


# ----------------------------------------------------------------------------------------------
# the layer maps a rule needs: forward with given parameters, and its vector-Jacobian product


@contextlib.contextmanager
def _parameters(module: nn.Module, weight, bias):
    """Temporarily give ``module`` other weight/bias tensors (put back in ``finally``)."""
    saved = {k: module._parameters[k] for k in ("weight", "bias") if k in module._parameters}
    try:
        if "weight" in saved:
            module._parameters["weight"] = weight
        if "bias" in saved:
            module._parameters["bias"] = bias
        yield module
    finally:
        module._parameters.update(saved)


_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _fast(module: nn.Module) -> bool:
    """Plain Linear / Conv layers: forward and backward with explicit weights, no autograd graph."""
    if type(module) is nn.Linear:
        return True
    return type(module) in _CONV and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _forward(module: nn.Module, x: torch.Tensor, weight, bias) -> torch.Tensor:
    if type(module) is nn.Linear:
        return F.linear(x, weight, bias)
    if _fast(module):
        conv = _CONV[type(module)]
        return conv(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    with _parameters(module, weight, bias):  # e.g. timm's Conv2dSame: its own padding, our weights
        return module.forward(x)  # .forward: the rule's own hook must not fire again


def _vjp(module: nn.Module, x: torch.Tensor, weight, s: torch.Tensor) -> torch.Tensor:
    """``J^T s`` of the layer's linear part at ``x`` (weights ``weight``): ``sum_j w_ij s_j``."""
    if _fast(module):
        return _fast_vjp(module, x, weight, s)
    if _tf_same(module):
        return _same_vjp(module, x, weight, s)
    xi = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = _forward(module, xi, weight, None)
        (g,) = torch.autograd.grad(z, xi, s)
    return g


def _fast_vjp(module: nn.Module, like: torch.Tensor, weight, s: torch.Tensor) -> torch.Tensor:
    """``J^T s`` of a plain Linear / Conv layer with weights ``weight``, shaped and laid out as the input ``like``.

    The convolution's input-gradient kernel is called with ``like`` itself (its values are not read):
    the kernel takes the memory layout from it, so a channels-last input gives a channels-last product
    without copies (``torch.nn.grad.conv2d_input`` passes an expanded dummy that asks for NCHW, and the
    kernels then copied ``s`` and the product between layouts).
    """
    if type(module) is nn.Linear:
        return s @ weight  # (N, out) @ (out, in) -> (N, in)
    if _pointwise(module, like, s):
        return _pointwise_vjp(weight, s)
    return _conv_input_grad(like, weight, s, module.stride, module.padding, module.dilation, module.groups)


def _pointwise(module: nn.Module, like: torch.Tensor, s: torch.Tensor) -> bool:
    """A 1x1 convolution (stride 1, no padding, one group) of one channels-last image: its product is a matrix product.

    PyTorch's CPU dispatcher runs these on its slow (THNN) path; one matrix product of the ``(H W, out)``
    view of ``s`` gives the same values (bit-equal on EfficientNet-Lite0's shapes, 1 thread) up to twice as
    fast on the large early maps. Only for one image: at batch 8 the convolution kernel was faster.
    """
    return (type(module) is nn.Conv2d and like.dim() == 4 and like.shape[0] == 1 and module.groups == 1
            and module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0)
            and module.dilation == (1, 1) and like.is_contiguous(memory_format=torch.channels_last)
            and s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous())


def _pointwise_vjp(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``J^T s`` of a 1x1 convolution for one channels-last image ``s`` (1, out, H, W): ``(H W, out) @ (out, in)``."""
    _, out, h, w = s.shape
    g = s.permute(0, 2, 3, 1).reshape(h * w, out) @ weight.reshape(out, -1)  # (H W, in), a view of channels-last s
    return g.view(1, h, w, -1).permute(0, 3, 1, 2)  # (1, in, H, W), channels-last


def _conv_input_grad(like: torch.Tensor, weight, s: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """The convolution's input gradient for output gradient ``s``, in the shape and memory layout of ``like``."""
    zeros = [0] * (like.dim() - 2)
    padding = [padding] * len(zeros) if isinstance(padding, int) else padding
    return torch.ops.aten.convolution_backward(s, like, weight, None, stride, padding, dilation, False, zeros, groups,
                                               [True, False, False])[0]


def _empty_like(x: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` in ``x``'s memory layout (channels-last stays channels-last)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return x.new_empty(shape)


def _tf_same(module: nn.Module) -> bool:
    """timm's ``Conv2dSame``: TensorFlow "same" zero padding computed from the input size, then a plain convolution."""
    return type(module).__name__ == "Conv2dSame" and type(module).__module__.startswith("timm.") \
        and isinstance(module, nn.Conv2d)


def _same_vjp(module: nn.Module, x: torch.Tensor, weight, s: torch.Tensor) -> torch.Tensor:
    """``J^T s`` of a ``Conv2dSame``: the padded input's product, cropped (autograd's steps, without its forward)."""
    pads = [max((-(-size // st) - 1) * st + (k - 1) * d + 1 - size, 0)
            for size, k, st, d in zip(x.shape[-2:], weight.shape[-2:], module.stride, module.dilation)]
    shape = (*x.shape[:-2], x.shape[-2] + pads[0], x.shape[-1] + pads[1])
    g = _conv_input_grad(_empty_like(x, shape), weight, s, module.stride, 0, module.dilation, module.groups)
    top, left = pads[0] // 2, pads[1] // 2
    return g[..., top:top + x.shape[-2], left:left + x.shape[-1]]


# ----------------------------------------------------------------------------------------------
# the generic rule


class LRPRule(BackwardRule):
    """The generic LRP rule; every named rule below is this class with other terms.

    Parameters
    ----------
    groups : sequence of Group
        Terms with a shared denominator each; the relevance of a group is multiplied by its scale.
    stabilizer : float
        ``epsilon`` of :func:`stabilize`, added to every denominator with its sign.
    bias : bool
        False: every term leaves the bias out (the layer's relevance is then exactly conserved).
    name : str
    relative : bool
        Scale the stabilizer by the root-mean-square of each sample's denominator.
    """

    def __init__(self, groups: Sequence[Group], stabilizer: float = 1e-6, bias: bool = True, name: str = "lrp",
                 relative: bool = False):
        if not isinstance(stabilizer, (int, float)) or isinstance(stabilizer, bool) or stabilizer < 0:
            raise ValueError(f"the stabilizer (epsilon) must be a number >= 0, got {stabilizer!r}")
        self.relative = bool(relative)
        self.groups = tuple(groups)
        self.stabilizer = float(stabilizer)
        self.bias = bool(bias)
        self.name = name

    def __repr__(self) -> str:
        extra = "" if self.bias else ", bias=False"
        return f"{self.name}(stabilizer={self.stabilizer:g}{extra})"

    @reference  # the engine of every LRP rule: exercise set 04_lrp blocks it
    def backward(self, module, inputs, output, grad_out):
        """Relevance at the inputs from relevance ``grad_out`` at the output (the gradient trick).

        A group whose outputs receive no relevance (``where="negative"`` behind a ReLU, whose
        negative outputs pass none on) is skipped: its terms would add exactly zero.
        """
        xs = [t.detach() for t in inputs]
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None) if self.bias else None
        weight = weight.detach() if isinstance(weight, torch.Tensor) else None
        bias = bias.detach() if isinstance(bias, torch.Tensor) else None
        fused = self._fused_backward(module, xs, output, grad_out, weight, bias)
        if fused is not None:
            return fused
        relevance = [None] * len(xs)
        memo: dict = {}  # modified inputs, weights and biases: computed once for all groups of this call
        reached = _groups_relevance(self.groups, output, grad_out)
        stacked = _stacked_backward(self, module, xs, reached, weight, bias, memo)
        if stacked is not None:
            return stacked
        for group, reaching in zip(self.groups, reached):
            if reaching is None:
                continue
            parts, z = self._terms(group, module, xs, output, weight, bias, memo)
            if z is None:
                continue
            s = reaching / stabilize(z, self.stabilizer, self.relative)  # (N, out...); 0 where masked
            for term, tx, w in parts:
                grads = [_vjp(module, tx[0], w, s)] if weight is not None else _param_free_vjp(module, term, tx, s)
                coef = group.scale * term.sign
                for i, (t, g) in enumerate(zip(tx, grads)):
                    contribution = (t if coef == 1 else coef * t) * g
                    relevance[i] = contribution if relevance[i] is None else relevance[i].add_(contribution)
        return tuple(torch.zeros_like(x) if r is None else r for x, r in zip(xs, relevance))

    def _terms(self, group: Group, module, xs, output, weight, bias, memo: dict | None = None):
        """The group's terms that contribute ``(term, modified inputs, modified weight)`` and their summed outputs."""
        parts, z = [], None
        memo = {} if memo is None else memo
        for term in group.terms:
            inputs = [_modified_input(memo, term.input, i, x) for i, x in enumerate(xs)]
            if (bias is None or term.bias is None) and all(_is_zero(memo, term.input, i) for i in range(len(xs))):
                continue  # a zero input without bias adds nothing (e.g. x- after a ReLU); its weights are not needed
            w = _memo(memo, "weight", term.weight, weight) if weight is not None else None
            b = _memo(memo, "bias", term.bias, bias) if (bias is not None and term.bias is not None) else None
            tx = [t if t is not None else torch.zeros_like(x) for (t, _), x in zip(inputs, xs)]
            if (term.unmodified and weight is not None and self.bias) or term.op is _own_map:
                zk = output.detach()  # the layer's own output: no second forward
            elif term.op is not None:
                zk = term.op(module, *tx)
            elif weight is None:
                zk = module.forward(*tx)
            else:
                zk = _forward(module, tx[0], w, b)
            z = _signed_sum(z, term.sign, zk)
            parts.append((term, tx, w))
        return parts, z

    def _fused_backward(self, module, xs, output, grad_out, weight, bias):
        """A rule-specific faster path with the same result, or None (the generic terms)."""
        return None


def _stacked_backward(rule: LRPRule, module, xs, reached: list, weight, bias, memo: dict):
    """Every term of the groups that relevance reaches in one forward and one product, or None (the generic terms).

    For rules whose terms take the sign parts ``x+`` / ``x-`` (LRP-gamma, alpha-beta) on a plain Conv (one
    group) or Linear layer, when more than one (group, sign part) pair contributes: signed inputs (behind
    a residual sum) or relevance at negative outputs (a linear projection). The parts are stacked along the
    input channels ``[x+, x-]``, each group's modified weights along the output channels, so that one
    convolution gives every group's denominator and one transposed convolution every product (the same
    multiply-adds in fewer, larger calls). Equal to the generic terms up to float rounding
    (tests/test_lrp_speed.py); a layer with one pair (behind a ReLU, into a ReLU) keeps the generic path.
    """
    groups = [(g, r) for g, r in zip(rule.groups, reached) if r is not None]
    x = xs[0] if len(xs) == 1 else None
    if x is None or weight is None or not groups or not _fast(module) or getattr(module, "groups", 1) != 1 \
            or (type(module) is nn.Linear and x.dim() != 2) \
            or any(len(g.terms) != 2 or {t.input for t in g.terms} != {_pos, _neg}
                   or any(t.op is not None or t.sign != 1 for t in g.terms) for g, _ in groups):
        return None
    parts = [fn for fn in (_pos, _neg) if _modified_input(memo, fn, 0, x) and not _is_zero(memo, fn, 0)]
    if len(parts) * len(groups) <= 1:
        return None
    stacked_x = torch.cat([_modified_input(memo, fn, 0, x)[0] for fn in parts], 1) if len(parts) > 1 \
        else _modified_input(memo, parts[0], 0, x)[0]
    weights, biases = [], []
    for group, _ in groups:
        by_input = {t.input: t for t in group.terms}
        weights.append(torch.cat([_memo(memo, "weight", by_input[fn].weight, weight) for fn in parts], 1))
        with_bias = [t for t in group.terms if t.bias is not None]
        biases.append(_memo(memo, "bias", with_bias[0].bias, bias) if bias is not None and with_bias
                      else weight.new_zeros(weight.shape[0]))
    w = torch.cat(weights, 0)
    b = torch.cat(biases) if bias is not None else None
    zs = _forward(module, stacked_x, w, b).split(weight.shape[0], 1)
    s = torch.cat([(g.scale * r if g.scale != 1 else r) / stabilize(z, rule.stabilizer, rule.relative)
                   for (g, r), z in zip(groups, zs)], 1)
    products = stacked_x * _fast_vjp(module, stacked_x, w, s)
    if len(parts) == 1:
        return (products,)
    pos, neg = products.split(x.shape[1], 1)
    return (pos + neg,)


def _signed_sum(z, sign: float, zk: torch.Tensor) -> torch.Tensor:
    """``z + sign * zk`` (``sign * zk`` when ``z`` is None), without multiplying by 1 or -1."""
    if z is None:
        return zk if sign == 1 else sign * zk
    if sign == 1:
        return z + zk
    return z - zk if sign == -1 else z + sign * zk


def _groups_relevance(groups, output: torch.Tensor, grad_out: torch.Tensor) -> list:
    """For each group ``grad_out`` on its outputs (zero elsewhere), or None when no relevance reaches them.

    None is exact: ``s = R / z`` is then zero wherever the mask lets it through, and every term of
    the group adds ``x * J^T 0 = 0``. Behind a ReLU the outputs below zero receive no relevance (the
    next layer's inputs are zero there), so LRP-gamma's mirror-image group costs nothing. Only the
    negative-output group is tested (relevance nearly always reaches the positive outputs, and a group
    computed without any adds exact zeros); when the positive group's relevance already equals
    ``grad_out`` (nothing at outputs <= 0), that test is one comparison.

    The masks are float 1 / 0 (the sign of the clamped output) in a product, not ``torch.where``: equal
    values (R * 1 = R, R * 0 = 0) in float-only passes, several times faster on the CPU than boolean masks.
    """
    out: list = []
    positive = None
    output = output.detach()
    for group in groups:
        if group.scale == 0:
            out.append(None)
        elif group.where == "all":
            out.append(grad_out)
        elif group.where == "positive":
            positive = grad_out * output.clamp(min=0).sign_()
            out.append(positive)
        elif positive is not None and torch.equal(positive, grad_out):
            out.append(None)  # grad_out is zero wherever output <= 0
        else:
            reaching = grad_out * output.clamp(max=0).sign_().neg_()
            out.append(reaching if int(torch.count_nonzero(reaching)) else None)
    return out


def _memo(memo: dict, kind: str, fn: Callable, t: torch.Tensor) -> torch.Tensor:
    """``fn(t)`` computed once per backward call (the groups of LRP-gamma share their modified weights)."""
    key = (kind, fn)
    if key not in memo:
        memo[key] = fn(t)
    return memo[key]


def _modified_input(memo: dict, fn: Callable, i: int, x: torch.Tensor):
    """``(fn(x) or None when it is known to be all zero, known-zero flag or None)``, once per backward call.

    For the sign parts ``x+`` and ``x-`` one pass over ``x`` (its minimum and maximum) says which is zero
    and which is ``x`` itself, so a non-negative input (behind a ReLU) costs no clamp and no zero test.
    """
    key = ("input", fn, i)
    if key not in memo:
        if (fn is _pos or fn is _neg) and x.numel():
            signs = ("signs", i)
            if signs not in memo:  # amin / amax: vectorised reductions (aminmax copied channels-last inputs)
                memo[signs] = (bool(x.amin() >= 0), bool(x.amax() <= 0))  # NaN: neither, as before
            nonneg, nonpos = memo[signs]
            keep, zero = (nonneg, nonpos) if fn is _pos else (nonpos, nonneg)
            memo[key] = (None if zero else x if keep else fn(x), zero)
        else:
            memo[key] = (fn(x), None)
    return memo[key]


def _is_zero(memo: dict, fn: Callable, i: int) -> bool:
    """Whether the modified input ``fn(x)`` (from :func:`_modified_input`) is all zero, tested once per backward call."""
    key = ("input", fn, i)
    value, zero = memo[key]
    if zero is None:
        zero = not int(torch.count_nonzero(value))  # faster than .any() on the CPU
        memo[key] = (value, zero)
    return zero


def _param_free_vjp(module, term: Term, tx, s):
    leaves = [t.detach().requires_grad_(True) for t in tx]
    with torch.enable_grad():
        z = term.op(module, *leaves) if term.op is not None else module.forward(*leaves)
        return torch.autograd.grad(z, leaves, s)


# ----------------------------------------------------------------------------------------------
# the named rules


@RULES.register
class Epsilon(LRPRule):
    """LRP-epsilon (Bach et al. 2015): ``R_i = sum_j x_i w_ij / (z_j + eps sign(z_j)) R_j``; LRP-0 at eps=0.

    A larger ``epsilon`` absorbs the relevance of weak, contradictory activations (a sparser, less
    noisy map) at the price of conservation.
    """

    def __init__(self, epsilon: float = 1e-6, bias: bool = True, relative: bool = False):
        super().__init__([Group((Term(),))], stabilizer=epsilon, bias=bias, name="Epsilon", relative=relative)
        self.epsilon = self.stabilizer

    def __repr__(self) -> str:
        extra = ("" if self.bias else ", bias=False") + (", relative=True" if self.relative else "")
        return f"Epsilon({self.epsilon:g}{extra})" if self.epsilon else f"LRP-0({extra.lstrip(', ')})"


@RULES.register
class Gamma(LRPRule):
    """LRP-gamma (Montavon et al. 2019), generalised to negative inputs (Andeol et al. 2021, as in zennit).

    Positive outputs: ``(x+ (w + gamma w+) + x- (w + gamma w-))``; negative outputs the mirror image.
    ``gamma`` favours positive contributions; ``gamma -> inf`` approaches z+ (alpha=1, beta=0).
    """

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6, bias: bool = True):
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma < 0:
            raise ValueError(f"gamma must be a number >= 0, got {gamma!r}")
        up, down = _gamma(gamma, _pos), _gamma(gamma, _neg)
        positive = Group((Term(_pos, up, up), Term(_neg, down, None)), where="positive")
        negative = Group((Term(_pos, down, down), Term(_neg, up, None)), where="negative")
        super().__init__([positive, negative], stabilizer=stabilizer, bias=bias, name="Gamma")
        self.gamma = float(gamma)

    def __repr__(self) -> str:
        return f"Gamma({self.gamma:g})"


@RULES.register
class AlphaBeta(LRPRule):
    """LRP-alpha-beta (Bach et al. 2015): ``alpha * R+ - beta * R-`` with ``alpha - beta = 1``.

    ``R+`` redistributes with the positive contributions ``x+ w+ + x- w-`` only, ``R-`` with the
    negative ones; ``alpha=1, beta=0`` (z+) keeps only what speaks for the class,
    ``alpha=2, beta=1`` also shows what speaks against it.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, bias: bool = True):
        for v, n in ((alpha, "alpha"), (beta, "beta")):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{n} must be a number >= 0, got {v!r}")
        if abs(alpha - beta - 1) > 1e-12:
            raise ValueError(
                f"alpha - beta must be 1 so that relevance is conserved, got alpha={alpha}, beta={beta}; "
                "common choices are (1, 0) and (2, 1)"
            )
        plus = Group((Term(_pos, _pos, _pos), Term(_neg, _neg, None)), scale=float(alpha))
        minus = Group((Term(_pos, _neg, _neg), Term(_neg, _pos, None)), scale=-float(beta))
        super().__init__([plus, minus], stabilizer=stabilizer, bias=bias, name="AlphaBeta")
        self.alpha, self.beta = float(alpha), float(beta)

    def __repr__(self) -> str:
        return f"AlphaBeta({self.alpha:g}, {self.beta:g})"


@RULES.register
class ZPlus(AlphaBeta):
    """z+ = alpha-beta with alpha=1, beta=0 (Montavon et al. 2017, deep Taylor decomposition)."""

    def __init__(self, stabilizer: float = 1e-6, bias: bool = True):
        super().__init__(1.0, 0.0, stabilizer=stabilizer, bias=bias)

    def __repr__(self) -> str:
        return "ZPlus()"


@RULES.register
class ZBox(LRPRule):
    """z^B for the pixel layer (Montavon et al. 2017): inputs bounded by ``low <= x <= high``.

    ``R_i = sum_j (x_i w_ij - l_i w_ij+ - h_i w_ij-) / z_j^B R_j``. Give ``low`` and ``high`` in
    **pixel units** ([0, 1] for the course's models): an LRP composite converts them through the
    model's normalisation layer (``(low - mean) / std``), because the first convolution sees
    normalised values. Bounds given in normalised units would be converted twice.

    Parameters
    ----------
    low, high : float or Tensor broadcastable to (1, C, 1, 1)
    stabilizer : float
    mean, std : Tensor (1, C, 1, 1), optional
        The normalisation in front of the layer (set by the composite, see :meth:`through`).
    """

    def __init__(self, low=0.0, high=1.0, stabilizer: float = 1e-6, mean=None, std=None):
        # kept where they are given (a number: the CPU); moved to the layer input's device at use (_bound)
        low_t, high_t = (torch.as_tensor(b, dtype=torch.float32, device=b.device if isinstance(b, torch.Tensor) else "cpu")
                         for b in (low, high))
        if (low_t > high_t).any():
            raise ValueError(f"ZBox needs low <= high, got low={low!r}, high={high!r}")
        self.low, self.high, self.mean, self.std = low, high, mean, std
        lo, hi = low_t, high_t
        if mean is not None:
            lo, hi = (lo - mean) / std, (hi - mean) / std  # pixel bounds -> the units the layer sees
        self._bounds = (lo, hi)
        terms = (Term(), Term(self._lower, _pos, _pos, -1.0), Term(self._upper, _neg, _neg, -1.0))
        super().__init__([Group(terms)], stabilizer=stabilizer, bias=True, name="ZBox")

    def _bound(self, b, x):
        b = b.to(x)
        return b.view(1, -1, *([1] * (x.dim() - 2))).expand_as(x) if b.dim() == 1 else b.expand_as(x)

    def _lower(self, x):
        return self._bound(self._bounds[0], x)

    def _upper(self, x):
        return self._bound(self._bounds[1], x)

    def _fused_backward(self, module, xs, output, grad_out, weight, bias):
        """z^B's three terms in one forward on the bounds and one vector-Jacobian product.

        The bounds are the same for every image, so their term ``l w+ + h w-`` is one convolution of
        a single stacked image ``[l, h]`` with the stacked weights ``[w+, w-]``, broadcast over the
        batch; the three products ``J^T s`` (weights ``w``, ``w+``, ``w-``) are one transposed
        convolution with the weights stacked along the input channels. Equal to the generic terms up
        to float rounding (tests/test_lrp.py compares them); other layers take the generic path.
        """
        if weight is None or len(xs) != 1 or not _fast(module) or getattr(module, "groups", 1) != 1 \
                or (type(module) is nn.Linear and xs[0].dim() != 2):
            return None
        x = xs[0]
        low, high = self._lower(x[:1]), self._upper(x[:1])  # (1, C, ...) views
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        bound_bias = None if bias is None else bias.clamp(min=0) + bias.clamp(max=0)
        zb = _forward(module, torch.cat([low, high], 1), torch.cat([w_pos, w_neg], 1), bound_bias)
        s = grad_out / stabilize(output.detach() - zb, self.stabilizer)
        shape = (x.shape[0], 3 * x.shape[1], *x.shape[2:])
        g = _fast_vjp(module, _empty_like(x, shape), torch.cat([weight, w_pos, w_neg], 1), s)
        g_x, g_low, g_high = g.split(x.shape[1], dim=1)
        return (x * g_x - low * g_low - high * g_high,)

    def through(self, mean, std) -> ZBox:
        """The same pixel bounds behind a normalisation ``(x - mean) / std``."""
        return ZBox(self.low, self.high, self.stabilizer, mean=mean, std=std)

    def __repr__(self) -> str:
        return f"ZBox(low={self.low}, high={self.high})"


@RULES.register
class Flat(LRPRule):
    """Flat (Lapuschkin et al. 2019): the relevance of a unit spread evenly over its receptive field."""

    def __init__(self, stabilizer: float = 1e-6):
        super().__init__([Group((Term(_ones, _ones, None),))], stabilizer=stabilizer, bias=False, name="Flat")

    def __repr__(self) -> str:
        return "Flat()"


@RULES.register
class WSquare(LRPRule):
    """w^2 (Montavon et al. 2017): ``R_i = sum_j w_ij^2 / sum_i' w_i'j^2 R_j``, for unbounded inputs."""

    def __init__(self, stabilizer: float = 1e-6):
        super().__init__([Group((Term(_ones, _square, None),))], stabilizer=stabilizer, bias=False, name="WSquare")

    def __repr__(self) -> str:
        return "WSquare()"


@RULES.register
class Norm(LRPRule):
    """Proportional to each input's share of the output: average pooling and sums (residual additions)."""

    def __init__(self, stabilizer: float = 1e-6):
        super().__init__([Group((Term(op=_own_map),))], stabilizer=stabilizer, name="Norm")

    def __repr__(self) -> str:
        return "Norm()"


def _own_map(module, *xs):
    return module.forward(*xs)


def _average_instead(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    kernel, stride, pad = module.kernel_size, module.stride, module.padding
    if getattr(module, "dilation", 1) not in (1, (1, 1)):
        raise ValueError(f"ProportionalPool does not support dilated max pooling (dilation={module.dilation})")
    pool = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}[x.dim()]
    return pool(x, kernel, stride, pad, ceil_mode=module.ceil_mode, count_include_pad=False)


@RULES.register
class ProportionalPool(LRPRule):
    """Max pooling, relevance shared in proportion to the inputs of each window (not winner-take-all)."""

    def __init__(self, stabilizer: float = 1e-6):
        super().__init__([Group((Term(op=_average_instead),))], stabilizer=stabilizer, name="ProportionalPool")

    def __repr__(self) -> str:
        return "ProportionalPool()"


@RULES.register
class Relay(BackwardRule):
    """Relevance passes unchanged (element-wise layers: ReLU, ReLU6, normalisation, batch-norm left in place)."""

    name = "relay"

    def backward(self, module, inputs, output, grad_out):
        return (grad_out,) + tuple(torch.zeros_like(t) for t in inputs[1:])


@RULES.register
class GradientRule(BackwardRule):
    """The layer's plain gradient as a backward rule (what :class:`coursekit.rules.Pass` does, but observable)."""

    name = "gradient"

    def backward(self, module, inputs, output, grad_out):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        with torch.enable_grad():
            z = module.forward(*leaves)
            return torch.autograd.grad(z, leaves, grad_out)


WINNER_TAKE_ALL = Pass()  # max pooling: the gradient routes each window's relevance to its maximum
