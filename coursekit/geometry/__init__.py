"""Where each unit of a CNN looks: receptive fields and unit windows (plumbing, shared by lectures 1 and 2).

* :mod:`.analytic` -- the recursion of Araujo, Norris & Sim (2019) over the modules' kernel size,
  stride, padding and dilation: :func:`receptive_fields`, :class:`UnitWindows`;
* :mod:`.measured` -- the same fields measured with autograd on a linearised copy of the model, for
  any architecture: :func:`empirical_receptive_field`;
* :func:`unit_windows` -- the input box each unit of one layer sees (analytic where the walk applies,
  measured otherwise), e.g. to crop dataset-example patches in lecture 2.

Lecture 1 teaches these (:mod:`coursekit.receptive_fields` re-exports them with its tables and
figures); lecture 2 (:mod:`coursekit.representations`) crops patches with :func:`unit_windows`.
"""

from __future__ import annotations

from torch import nn

from ..hooks import get_layer
from ..inputs import check_model
from .analytic import (
    ReceptiveField,
    UnitWindows,
    UnsupportedLayerError,
    analytic_fields,
    collapse_pair,
    input_hw,
    per_dimension,
    receptive_fields,
)
from .measured import (
    EmpiricalReceptiveField,
    empirical_receptive_field,
    input_channels,
    measured_windows,
    required_hw,
)

__all__ = [
    "EmpiricalReceptiveField",
    "ReceptiveField",
    "UnitWindows",
    "UnsupportedLayerError",
    "analytic_fields",
    "collapse_pair",
    "empirical_receptive_field",
    "input_hw",
    "per_dimension",
    "receptive_fields",
    "unit_windows",
]


def unit_windows(model: nn.Module, layer: str | nn.Module, input_size: tuple[int, ...] | None = None) -> UnitWindows:
    """The box of input pixels each unit of ``layer`` sees, e.g. to cut out dataset-example patches.

    Computed with :func:`receptive_fields` (exact; a window may reach outside the input) when the
    analytic walk can follow the model up to ``layer``. Where it cannot (branching networks such as
    GoogLeNet or ResNets, unknown modules, layers after global pooling) the windows are measured
    with the gradient probe of :func:`empirical_receptive_field` instead (see the notes).

    Parameters
    ----------
    model, layer, input_size
        As in :func:`empirical_receptive_field`: ``layer`` must output a feature map ``(N, K, h, w)``.

    Returns
    -------
    UnitWindows
        ``.box(i, j)`` -> ``(top, left, height, width)`` of unit ``(i, j)``, ``.crop(image, i, j)``.

    Raises
    ------
    ValueError
        Without an input size, or when ``layer`` does not output a feature map.

    Notes
    -----
    The measurement takes size and stride from the central unit and its diagonal neighbour on an
    input enlarged (up to 8 times) until neither window touches the border, and places the windows
    by the bottom / right edge of unit (0, 0)'s window at the real input size (on the enlarged
    input where that window covers the whole image). When even 8 times the input cuts the field
    off, ``clipped`` is True and ``size`` is a lower bound.
    """
    check_model(model)
    name, _ = get_layer(model, layer)
    hw = required_hw(model, input_size)
    try:
        fields = analytic_fields(model, hw, until=name)
    except UnsupportedLayerError:
        fields = []  # a branch or an unknown module before the layer: measure instead
    field = next((f for f in fields if f.layer == name), None)
    if field is not None:
        return field.windows()
    return measured_windows(model, name, input_channels(model, input_size), hw)
