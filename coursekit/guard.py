"""The guard: everything a method may touch on the user's model, restored exactly, even on error.

Every coursekit method that runs a user's model does so inside :func:`guarded`. The contract:

* **eval mode.** Explanations, attacks and pictures are computed in eval mode. A model found in
  train mode (torchvision builds its models that way; a student may have called ``model.train()``)
  is switched to eval for the call, with a :class:`TrainModeWarning`, and switched back afterwards.
  Running it in train mode would overwrite batch-norm running statistics (147 buffers on
  EfficientNet-Lite0) and give a different map.
* **frozen parameters.** Input-gradient methods never need weight gradients: ``requires_grad`` is
  switched off inside, so no ``.grad`` is written and backward does not pay for weights.
* **in-place flags** (``nn.ReLU(inplace=True)``) can be switched off: hooks need a module's input
  and output apart.
* **hooks** registered on any module inside the block and still there at the end are removed; hooks
  the user had are kept.
* **structure** (with ``structure=True``): canonizers rewrite modules, parameters and buffers
  (batch-norm merged into a convolution); every ``_modules`` / ``_parameters`` / ``_buffers`` entry
  and every parameter / buffer value is put back (the values only where a canonizer may write into
  the model's tensors, ``values=True``; coursekit's canonizers swap modules and declare it with
  ``Canonizer.writes_tensors = False``).

Only what changed is written back: on a 275-module network the guard costs well under a
millisecond (``benchmarks/bench_saliency.py`` measures it inside every method).

:func:`model_state` is the one snapshot that tests and checks compare before and after a call.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TrainModeWarning", "guarded", "model_state", "ModelState", "hook_dicts", "user_stacklevel"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class TrainModeWarning(UserWarning):
    """A model in train mode was evaluated in eval mode (and put back in train mode afterwards)."""


def user_stacklevel() -> int:
    """The stacklevel that points a warning at the first frame outside coursekit (the user's call)."""
    import sys

    frame, level = sys._getframe(1), 1
    package = __name__.rsplit(".", 1)[0] + "."
    while frame is not None and (frame.f_globals.get("__name__", "").startswith(package)
                                 or frame.f_code.co_filename.endswith("contextlib.py")):
        frame, level = frame.f_back, level + 1
    return level


def hook_dicts(m: nn.Module) -> list:
    """The hook dictionaries a module holds itself (forward, pre-forward, backward, state-dict hooks...)."""
    own = m.__dict__
    return [own[attr] for attr in _HOOK_DICTS if attr in own]


@contextlib.contextmanager
def guarded(
    model: nn.Module,
    *,
    eval_mode: bool = True,
    freeze: bool = True,
    inplace_off: bool = False,
    structure: bool = False,
    values: bool = True,
    what: str = "this method",
) -> Iterator[nn.Module]:
    """Run the block on ``model`` and put back everything the block changed, even when it raises.

    Parameters
    ----------
    model : nn.Module
    eval_mode : bool
        Switch every module to eval inside; warn (:class:`TrainModeWarning`) when one was training.
    freeze : bool
        Switch ``requires_grad`` off on every parameter inside.
    inplace_off : bool
        Switch ``inplace`` off on every module that has the flag.
    structure : bool
        Also restore submodules, parameters and buffers (objects and values): for canonizers.
    values : bool
        With ``structure``: also copy every parameter and buffer and write back changed values (a canonizer
        that writes into the model's tensors). False: only the module / parameter / buffer entries are put
        back, for canonizers that only swap modules (coursekit's own: ``Canonizer.writes_tensors``); that
        skips a copy and a comparison of every tensor (~9 ms per call on EfficientNet-Lite0).
    what : str
        The method's name, for the warning.
    """
    modules = list(model.modules())
    modes = [m.training for m in modules]
    params = [p for m in modules for p in m._parameters.values() if p is not None]
    grads = [p.requires_grad for p in params]
    # plain attribute lookups: nn.Module.__getattr__ (a miss raises) would cost more than the rest
    inplace = [(m, f) for m in modules if isinstance(f := m.__dict__.get("inplace"), bool)]
    hooks = [(d, dict(d) if d else None) for m in modules
             for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)]
    saved_structure = _save_structure(modules, values) if structure else None
    try:
        if eval_mode and any(modes):
            warnings.warn(
                f"{type(model).__name__} is in train mode; {what} runs it in eval mode (batch-norm statistics "
                "and dropout frozen) and puts train mode back afterwards. Call model.eval() to silence this.",
                TrainModeWarning,
                stacklevel=user_stacklevel(),
            )
            for m, t in zip(modules, modes):
                if t:
                    m.training = False
        if freeze:
            for p, g in zip(params, grads):
                if g:
                    p.requires_grad_(False)
        if inplace_off:
            for m, f in inplace:
                if f:
                    m.inplace = False
        yield model
    finally:
        if saved_structure is not None:
            _restore_structure(saved_structure)
        for m, t in zip(modules, modes):
            if m.training != t:
                m.training = t
        for p, g in zip(params, grads):
            if p.requires_grad != g:
                p.requires_grad_(g)
        for m, f in inplace:
            if m.inplace != f:
                m.inplace = f
        for d, before in hooks:
            if before is None:
                if d:
                    d.clear()
            elif len(d) != len(before) or any(k not in before for k in d):
                d.clear()
                d.update(before)


def _save_structure(modules, values: bool = True):
    saved = []
    for m in modules:
        entry = {
            "_modules": dict(m._modules),
            "_parameters": dict(m._parameters),
            "_buffers": dict(m._buffers),
            # values too: a canonizer may write into the same tensor objects
            "values": {k: v.detach().clone() for k, v in list(m._parameters.items()) + list(m._buffers.items())
                       if v is not None} if values else {},
        }
        saved.append((m, entry))
    return saved


@torch.no_grad()
def _restore_structure(saved) -> None:
    for m, entry in saved:
        for attr in ("_modules", "_parameters", "_buffers"):
            current = getattr(m, attr)
            before = entry[attr]
            if current.keys() != before.keys() or any(current[k] is not v for k, v in before.items()):
                current.clear()
                current.update(before)
        for k, value in entry["values"].items():
            t = m._parameters.get(k) if k in m._parameters else m._buffers.get(k)
            if t is not None and (t.shape != value.shape or not torch.equal(t, value)):
                t.data = value


# ----------------------------------------------------------------------------------------------
# the snapshot that tests and checks compare


@dataclass
class ModelState:
    """What a method may touch on a model, as plain values (see :func:`model_state`)."""

    training: list[bool]
    requires_grad: list[bool]
    grads: list[bool]
    inplace: list[bool]
    hooks: list[int]
    modules: list[str]
    values: list[torch.Tensor] | None = None

    def differences(self, after: ModelState) -> list[str]:
        """Human-readable differences from ``self`` (before) to ``after``; empty when unchanged."""
        out = []
        if after.modules != self.modules:
            out.append("the model's modules were replaced or rearranged")
        if after.training != self.training:
            n = sum(a != b for a, b in zip(after.training, self.training))
            out.append(f"the train/eval mode of {n} module(s) changed")
        if after.requires_grad != self.requires_grad:
            n = sum(a != b for a, b in zip(after.requires_grad, self.requires_grad))
            out.append(f"requires_grad of {n} parameter(s) changed")
        if after.grads != self.grads:
            out.append("a parameter's .grad was written")
        if after.inplace != self.inplace:
            out.append("an in-place flag (e.g. nn.ReLU(inplace=True)) changed")
        if after.hooks != self.hooks:
            out.append(f"{sum(after.hooks) - sum(self.hooks)} hook(s) were left registered on the model")
        if self.values is not None and after.values is not None:
            if len(self.values) != len(after.values) or any(
                a.shape != b.shape or not torch.equal(a, b) for a, b in zip(self.values, after.values)
            ):
                out.append("parameter or buffer values changed (e.g. batch-norm running statistics)")
        return out


def model_state(model: nn.Module, values: bool = True) -> ModelState:
    """Snapshot of everything :func:`guarded` protects; compare two with ``before.differences(after)``.

    ``values=True`` also copies every parameter and buffer (batch-norm statistics included).
    """
    modules = list(model.named_modules())
    params = list(model.parameters())
    return ModelState(
        training=[m.training for _, m in modules],
        requires_grad=[p.requires_grad for p in params],
        grads=[p.grad is not None for p in params],
        inplace=[m.inplace for _, m in modules if isinstance(getattr(m, "inplace", None), bool)],
        hooks=[sum(len(d) for d in hook_dicts(m)) for _, m in modules],
        modules=[f"{n}:{type(m).__name__}" for n, m in modules],
        values=[t.detach().clone() for t in list(params) + list(model.buffers())] if values else None,
    )
