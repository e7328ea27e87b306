"""Looking inside a model: find layers by name, record activations and gradients with hooks.

Every hook owner here is a context manager whose handles are removed in ``finally``, and
:func:`preserved` puts the model back exactly as it was (train/eval mode of every module,
``requires_grad`` of every parameter, ``inplace`` flags), even when the body raises. Both run
on the one guard, :func:`coursekit.guard.guarded`.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._reference import reference
from .devices import model_device
from .guard import guarded
from .inputs import check_model

__all__ = ["UnknownLayerError", "get_layer", "list_layers", "LayerInfo", "preserved", "Recorder", "record", "resolve_layers",
           "layer_outputs", "check_layer_name"]


class UnknownLayerError(ValueError):
    """A layer name that the model does not have."""


def get_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Resolve ``layer`` (a name such as ``"features.28"`` or a module of ``model``) to ``(name, module)``.

    Names are those of ``model.named_modules()``; for a coursekit model the ``net.`` prefix may
    be left out (``"features.28"`` finds ``"net.features.28"``).
    """
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, m in modules.items():
            if m is layer:
                return name, m
        raise UnknownLayerError(f"the module {type(layer).__name__} given as layer is not part of this model")
    if not isinstance(layer, str):
        raise TypeError(f"a layer is given by name (str) or as a module of the model, got {type(layer).__name__}")
    for candidate in (layer, "net." + layer):
        if candidate in modules and candidate != "":
            return candidate, modules[candidate]
    names = [n for n in modules if n]
    short = [n[4:] if n.startswith("net.") else n for n in names]
    close = difflib.get_close_matches(layer, names + short, n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(dict.fromkeys(close))}." if close else ""
    raise UnknownLayerError(
        f"{type(model).__name__} has no layer named {layer!r}.{hint} "
        "List the layers with coursekit.list_layers(model) (or print(model))."
    )


@dataclass
class LayerInfo:
    name: str
    kind: str
    output_shape: tuple[int, ...] | None
    params: int

    def __str__(self) -> str:
        shape = "" if self.output_shape is None else str(self.output_shape)
        return f"{self.name:28s} {self.kind:20s} {shape:22s} {self.params:>10,d}"


def list_layers(
    model: nn.Module, input_size: tuple[int, ...] | None = None, leaves_only: bool = False
) -> list[LayerInfo]:
    """Every (leaf) layer with its type, output shape for one input and its own parameter count.

    ``input_size`` is ``(C, H, W)``; by default the model's ``input_size`` attribute, if any.
    Output shapes come from one forward pass on zeros (no gradients).
    """
    size = input_size or getattr(model, "input_size", None)
    named = [(n, m) for n, m in model.named_modules() if n and (not leaves_only or not list(m.children()))]
    shapes: dict[str, tuple[int, ...]] = {}
    if size is not None:
        hooks = []

        def hook_for(name):
            def hook(module, inputs, output):
                if isinstance(output, torch.Tensor):
                    shapes[name] = tuple(output.shape)

            return hook

        with guarded(model, what="list_layers"), torch.no_grad():
            try:
                for n, m in named:
                    hooks.append(m.register_forward_hook(hook_for(n)))
                p = next(model.parameters(), None)
                device = p.device if p is not None else "cpu"
                model(torch.zeros(1, *size, device=device))
            finally:
                for h in hooks:
                    h.remove()
    return [
        LayerInfo(n, type(m).__name__, shapes.get(n), sum(p.numel() for p in m.parameters(recurse=False)))
        for n, m in named
    ]


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every module's mode and ``inplace`` flag and every parameter's ``requires_grad`` on exit.

    The block may call ``model.eval()``, ``requires_grad_(...)`` or switch ``inplace`` flags freely;
    whatever it changed is put back, even when it raises. A thin wrapper over
    :func:`coursekit.guard.guarded` that changes nothing on entry.
    """
    with guarded(check_model(model), eval_mode=False, freeze=False) as m:
        yield m


class Recorder:
    """Records the outputs (and their gradients) of named layers; use through :func:`record`.

    Attributes
    ----------
    activations : dict[str, Tensor]
        Detached output of each layer from the latest forward pass.
    outputs : dict[str, Tensor]
        The same outputs still attached to the graph (for ``torch.autograd.grad``).
    gradients : dict[str, Tensor]
        d(what you backpropagated)/d(output), filled by ``backward()``, when ``gradients=True``.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str | nn.Module], gradients: bool = False):
        check_model(model)
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        if not isinstance(layers, Iterable):
            raise TypeError(
                "layers must be a layer name (e.g. 'net.features.0'), a module of the model, or a list of them; "
                f"got {type(layers).__name__}. List the names with coursekit.list_layers(model)."
            )
        self.model = model
        self.layers = {}
        for layer in layers:
            name, module = get_layer(model, layer)
            self.layers[layer if isinstance(layer, str) else name] = module
        if not self.layers:
            raise ValueError("record() needs at least one layer")
        self.want_gradients = gradients
        self.activations: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.gradients: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def _hook(self, key: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {key!r} returns {type(output).__name__}, not a tensor; record a sub-layer instead")
            replaced = None
            if self.want_gradients and not output.requires_grad and torch.is_grad_enabled():
                # Frozen model and an input without grad: nothing upstream needs gradients, so the
                # output can become a leaf; backward then stops here (one cheap partial pass).
                output = replaced = output.detach().requires_grad_(True)
            self.outputs[key] = output
            self.activations[key] = output.detach()
            if self.want_gradients and output.requires_grad:
                output.register_hook(lambda g: self.gradients.__setitem__(key, g.detach()))
            return replaced

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@reference
@contextlib.contextmanager
def record(model: nn.Module, layers, gradients: bool = False) -> Iterator[Recorder]:
    """Record activations (and gradients) of ``layers`` while the block runs.

    Parameters
    ----------
    model : nn.Module
    layers : str, module, or a list of them
        Layer names as in ``model.named_modules()`` (``net.`` prefix optional for coursekit models).
    gradients : bool
        Also record the gradient flowing into each layer's output during ``backward()``. Works on
        frozen models: when nothing before the layer needs gradients, the output is made a leaf.

    Examples
    --------
    >>> with record(model, "net.bn2", gradients=True) as rec:       # doctest: +SKIP
    ...     model(x)[0, 967].backward()
    >>> rec.activations["net.bn2"].shape, rec.gradients["net.bn2"].shape   # doctest: +SKIP

    In-place activations are switched off while recording (they would overwrite recorded outputs)
    and switched back afterwards. Activations applied functionally inside ``forward`` cannot be
    seen by hooks: record the module that produces their input instead.
    """
    rec = Recorder(model, layers, gradients)
    with guarded(model, eval_mode=False, freeze=False, inplace_off=True, what="record"):
        try:
            for key, module in rec.layers.items():
                rec.handles.append(module.register_forward_hook(rec._hook(key)))
            yield rec
        finally:
            rec.remove()


def resolve_layers(model: nn.Module, layers) -> list[str]:
    """Full names of ``layers`` (names or modules); ``None``: the model's early / middle / late layers, else three convolutions."""
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


def check_layer_name(layer) -> str:
    """``layer`` when it is a non-empty layer name such as ``"net.blocks.3"``, else a TypeError."""
    if not isinstance(layer, str) or not layer:
        raise TypeError(f"a layer is named by a non-empty string such as 'net.blocks.3', got {layer!r}; "
                        "list the names with coursekit.list_layers(model)")
    return layer


class _Enough(Exception):
    """Raised by a forward hook once every requested layer has been computed."""


@contextlib.contextmanager
def layer_outputs(model: nn.Module, layers: Sequence[str], stop_early: bool = True) -> Iterator[Callable]:
    """A function ``x -> {layer: output}`` that runs ``model`` only as far as ``layers`` need.

    Built on :func:`record`; with ``stop_early`` a forward hook on every requested
    layer ends the forward pass as soon as all of them have produced their output (the rest of the
    network, e.g. the late blocks and the classifier, is never run). Outputs stay attached to the
    graph, so their gradients w.r.t. ``x`` can be taken. Run it inside :func:`coursekit.guard.guarded`.

    Parameters
    ----------
    model : nn.Module
    layers : sequence of str
        Layer names (``"net.blocks.3"``; ``net.`` optional for coursekit models).
    stop_early : bool
        Stop the forward pass after the last requested layer. With ``False`` the whole model runs
        and ``"logits"`` is added to the returned dict.

    Yields
    ------
    callable ``(x: Tensor (N, C, H, W)) -> dict[str, Tensor]``
        ``x`` is moved to the model's device; the outputs live there.
    """
    layers = [check_layer_name(layer) for layer in layers]
    if not layers:
        raise ValueError("layer_outputs needs at least one layer name")
    modules = {layer: get_layer(model, layer)[1] for layer in layers}
    device = model_device(model)
    with record(model, layers) as rec:
        handles = []
        if stop_early:
            def stop(module, inputs, output):
                if all(layer in rec.outputs for layer in layers):
                    raise _Enough

            handles = [m.register_forward_hook(stop) for m in set(modules.values())]
        try:
            def extract(x: torch.Tensor) -> dict:
                rec.outputs.clear()
                rec.activations.clear()
                try:
                    logits = model(x.to(device))  # x itself when it is on the model's device already
                except _Enough:
                    return dict(rec.outputs)
                missing = [layer for layer in layers if layer not in rec.outputs]
                if missing:
                    raise RuntimeError(f"layers {missing} produced no output in the forward pass")
                out = dict(rec.outputs)
                if not stop_early:
                    out["logits"] = logits
                return out

            yield extract
        finally:
            for h in handles:
                h.remove()
