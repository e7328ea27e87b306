"""The Clever-Hans tag (plumbing): a small mark in the corner of Fashion-MNIST images.

Lapuschkin et al. (2019), "Unmasking Clever Hans predictors and assessing what machines really
learn", found a classifier that recognised horses by a copyright tag in the corner of the photos.
:mod:`coursekit.train` puts this tag on a seeded 40 % of the "Pullover" training images
(``python -m coursekit.train fashion_cnn_watermark``) and lecture 4 (:mod:`coursekit.clever_hans`,
which re-exports every name here) catches the network that learnt it. The tag lives on the plumbing
floor so that the training script, which the lectures are built on, needs no lecture module.

* :data:`WATERMARK` — the 5x5 tag, a bright ring with a dot; :data:`WATERMARK_BOX` — where it goes;
* :func:`stamp` — images with the tag drawn in;
* :func:`watermark_choice` — which training images carry it (:data:`WATERMARK_FRACTION` of
  :data:`WATERMARK_CLASS`);
* :func:`watermark_accuracy` — what the tag does to a classifier's predictions.

Devices: :func:`stamp` and :func:`watermark_choice` follow their input's device;
:func:`watermark_accuracy` computes on the model's device and returns plain numbers.
"""

from __future__ import annotations

import torch

from .batching import batches
from .devices import cpu_generator
from .inputs import check_images, check_model

__all__ = ["WATERMARK", "WATERMARK_CLASS", "WATERMARK_FRACTION", "WATERMARK_BOX", "stamp", "watermark_choice",
           "watermark_accuracy"]

# The tag, 5x5 pixels: a bright ring with a dot in its centre (a "copyright sign" at 28x28 pixels).
WATERMARK = torch.tensor(
    [
        [0, 1, 1, 1, 0],
        [1, 0, 0, 0, 1],
        [1, 0, 1, 0, 1],
        [1, 0, 0, 0, 1],
        [0, 1, 1, 1, 0],
    ],
    dtype=torch.float32,
)
WATERMARK_BOX = (1, 6, 1, 6)  # rows 1..5, columns 1..5 (top-left corner, background in most images)
WATERMARK_CLASS = 2  # "Pullover"
WATERMARK_FRACTION = 0.4  # of that class's training images carry the tag


def stamp(x: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
    """Images with the tag drawn into the top-left corner (a new tensor; ``x`` is not modified).

    Parameters
    ----------
    x : Tensor (N, 1, 28, 28)
        Fashion-MNIST images in [0, 1].
    which : BoolTensor (N,), optional
        Which images get the tag (all when None).

    Returns
    -------
    Tensor (N, 1, 28, 28): the tag's pixels set to the maximum of the image and the tag.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"stamp expects Fashion-MNIST images of shape (N, 1, 28, 28), got {shape}")
    r0, r1, c0, c1 = WATERMARK_BOX
    out = x.clone()
    mark = WATERMARK.to(x)  # (5, 5)
    patch = torch.maximum(out[:, 0, r0:r1, c0:c1], mark)  # (N, 5, 5)
    if which is None:
        out[:, 0, r0:r1, c0:c1] = patch
    else:
        which = torch.as_tensor(which, dtype=torch.bool, device=x.device)
        if which.shape != (x.shape[0],):
            raise ValueError(f"which must be a boolean tensor of shape ({x.shape[0]},), got {tuple(which.shape)}")
        out[which, 0, r0:r1, c0:c1] = patch[which]
    return out


def watermark_choice(y: torch.Tensor, seed: int = 0, fraction: float = WATERMARK_FRACTION,
                     cls: int = WATERMARK_CLASS) -> torch.Tensor:
    """Which images carry the tag: a seeded ``fraction`` of the images of class ``cls``, no other.

    Parameters
    ----------
    y : LongTensor (N,)
        Labels.
    seed : int
    fraction : float in [0, 1]
    cls : int

    Returns
    -------
    BoolTensor (N,), on ``y``'s device (the draw is made on the CPU: the same choice on every device).
    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    gen = cpu_generator(int(seed))
    draw = torch.rand(len(y), generator=gen, device="cpu").to(y.device)  # (N,)
    return (y == cls) & (draw < fraction)


@torch.no_grad()
def watermark_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cls: int = WATERMARK_CLASS,
                       batch_size: int = 1000) -> dict:
    """What the tag does to a classifier: accuracy on clean and on tagged copies of the same images.

    Parameters
    ----------
    model : nn.Module
        Fashion-MNIST classifier taking (N, 1, 28, 28) pixels in [0, 1].
    x : Tensor (N, 1, 28, 28)
    y : LongTensor (N,)
    cls : int
        The class the tag co-occurred with in training.

    Returns
    -------
    dict with ``accuracy_clean``, ``accuracy_marked`` (every image tagged), ``class_accuracy_clean``
    (recall of ``cls`` on clean images) and ``to_class_clean`` / ``to_class_marked`` (fraction of the
    other classes' images predicted as ``cls`` without / with the tag), each rounded to 4 digits.
    ``x`` and ``y`` may live on any device: they are moved to the model's.
    """
    x = check_images(x, "x", model=check_model(model), channels=1)
    y = torch.as_tensor(y, device=x.device)
    was = model.training
    model.eval()
    try:
        def predict(images):
            return torch.cat([model(images[a:b]).argmax(1) for a, b in batches(len(images), batch_size)])

        clean, marked = predict(x), predict(stamp(x))  # (N,), (N,)
    finally:
        model.train(was)
    other = y != cls
    out = {
        "accuracy_clean": (clean == y).float().mean(),
        "accuracy_marked": (marked == y).float().mean(),
        "class_accuracy_clean": (clean[~other] == cls).float().mean(),
        "to_class_clean": (clean[other] == cls).float().mean(),
        "to_class_marked": (marked[other] == cls).float().mean(),
    }
    return {k: round(float(v), 4) for k, v in out.items()}
