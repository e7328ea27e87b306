"""Training from scratch and transfer learning (lecture 0b): a fit loop a student can read in one screen.

* :func:`split_fashion_mnist` — a seeded train / validation / test split with no image in two parts.
* :func:`small_cnn` — a small three-block CNN, sized for 28 x 28 Fashion-MNIST.
* :func:`fit` — train / validate each epoch into a :class:`History`, with callbacks
  (:class:`EarlyStopping`, Prechelt 1998; :class:`LivePlot`), a tqdm.auto progress bar,
  optional augmentation (:class:`FlipShift`) and the model's own dropout (Srivastava et al. 2014).
* :class:`FrozenFeatures`, :func:`transfer_model`, :func:`extract_features` — an ImageNet network
  as a frozen feature extractor with a small trainable head (Yosinski et al. 2014): the backbone
  stays in eval mode (its BatchNorm statistics do not move) and only the head's parameters reach
  the optimiser.
* :func:`evaluate`, :func:`confusion_matrix`, :func:`plot_history`, :func:`plot_confusion`.

Unlike the explanation methods, :func:`fit` is *meant* to change the model's weights; the guard
contract becomes: on an error the model gets back every weight, buffer, mode and ``requires_grad``
flag it had before the call, and the exception is raised again.

References
----------
Prechelt, L. (1998). Early stopping - but when? In *Neural Networks: Tricks of the Trade*, 55-69.
Yosinski, J., Clune, J., Bengio, Y., & Lipson, H. (2014). How transferable are features in deep
neural networks? NeurIPS. https://arxiv.org/abs/1411.1792
Srivastava, N., Hinton, G., Krizhevsky, A., Sutskever, I., & Salakhutdinov, R. (2014). Dropout: a
simple way to prevent neural networks from overfitting. JMLR 15, 1929-1958.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._reference import reference
from .data import FASHION_CLASSES, fashion_mnist
from .devices import cpu_generator, model_device
from .inputs import check_model, positive_int
from .progress import progress_bar

__all__ = [
    "Split", "split_fashion_mnist", "stratified_subset", "small_cnn", "FlipShift", "History", "Callback",
    "EarlyStopping", "LivePlot", "fit", "train_epoch", "evaluate", "FrozenFeatures", "TransferNet", "transfer_model",
    "extract_features", "confusion_matrix", "plot_history", "plot_confusion",
]


# ----------------------------------------------------------------------------------------------
# data: a split with no leakage


@dataclass
class Split:
    """Train, validation and test parts, each ``(x (N, 1, 28, 28) in [0, 1], y (N,) int64)``."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    source: str  # where the images come from, in words

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)[1]) for name in ("train", "val", "test")}


def _pair(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[idx].contiguous(), y[idx].contiguous()


def split_fashion_mnist(n_val: int = 1000, n_test: int = 2000, seed: int = 0, source: str = "shipped") -> Split:
    """A seeded train / validation / test split of Fashion-MNIST (Xiao et al. 2017).

    Parameters
    ----------
    n_val, n_test : int
        Images in the validation and test parts.
    seed : int
        Seeds the one permutation that assigns every image to exactly one part.
    source : {"shipped", "full", "auto"}
        ``"shipped"``: the 10 000 images that ship with coursekit, permuted once and cut into test,
        validation and train (the rest); runs everywhere and gives the same split everywhere.
        ``"full"``: the 60 000-image training split (installed or downloaded, see
        :func:`coursekit.fashion_mnist`) gives train and validation, the official 10 000 test
        images the test part (``n_test`` of them). ``"auto"``: ``"full"`` when the 60k split is
        found, else ``"shipped"``.

    Returns
    -------
    Split
        No image index is in two parts: the parts are slices of one permutation.
    """
    if source not in ("shipped", "full", "auto"):
        raise ValueError(f"source must be 'shipped', 'full' or 'auto', got {source!r}")
    n_val, n_test = positive_int(n_val, "n_val"), positive_int(n_test, "n_test")
    x_test, y_test = fashion_mnist("test")  # (10000, 1, 28, 28), (10000,)
    full = None
    if source in ("full", "auto"):
        try:
            full = fashion_mnist("train")
        except FileNotFoundError:
            if source == "full":
                raise
    gen = cpu_generator(seed)
    if full is None:
        if n_val + n_test >= len(y_test):
            raise ValueError(f"n_val + n_test = {n_val + n_test} leaves no training image of the {len(y_test)} "
                             "shipped ones: ask for fewer")
        perm = torch.randperm(len(y_test), generator=gen, device="cpu")
        test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
        return Split(_pair(x_test, y_test, train), _pair(x_test, y_test, val), _pair(x_test, y_test, test),
                     f"the {len(y_test)} shipped Fashion-MNIST images, split once (seed {seed})")
    x_train, y_train = full
    if n_val >= len(y_train) or n_test > len(y_test):
        raise ValueError(f"n_val = {n_val} (of {len(y_train)}) or n_test = {n_test} (of {len(y_test)}) is too large")
    perm = torch.randperm(len(y_train), generator=gen, device="cpu")
    test = torch.randperm(len(y_test), generator=gen, device="cpu")[:n_test]
    return Split(_pair(x_train, y_train, perm[n_val:]), _pair(x_train, y_train, perm[:n_val]),
                 _pair(x_test, y_test, test),
                 f"train/validation from the {len(y_train)}-image training split, test from the official test split")


def stratified_subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``(x, y)`` with every class as equally represented as ``n`` allows (seeded).

    With 100 images and 10 classes, 10 of each: a small training set whose accuracy does not
    depend on which classes happened to be drawn.
    """
    n = positive_int(n, "n")
    if n > len(y):
        raise ValueError(f"n = {n} is more than the {len(y)} images given")
    gen = cpu_generator(seed)
    order = torch.randperm(len(y), generator=gen, device="cpu").to(y.device)  # (N,) drawn on the CPU, on y's device
    # rank of each image inside its class (in permuted order); taking ranks 0, 1, ... round-robin balances classes
    ys = y[order]
    rank = torch.zeros(len(y), dtype=torch.long, device=y.device)
    for c in ys.unique():
        members = (ys == c).nonzero().flatten()
        rank[members] = torch.arange(len(members), device=y.device)
    chosen = order[torch.argsort(rank * len(y) + torch.arange(len(y), device=y.device), stable=True)[:n]]
    return x[chosen].contiguous(), y[chosen].contiguous()


# ----------------------------------------------------------------------------------------------
# models


def small_cnn(width: int = 16, dropout: float = 0.0, num_classes: int = 10) -> nn.Sequential:
    """A small CNN (three conv-ReLU-pool blocks then a dense layer), for 28 x 28 grey images.

    Made on PyTorch's default device (the CPU), as ``nn.Conv2d`` is: move it with ``.to(device)``.
    ``dropout`` > 0 puts an ``nn.Dropout`` (Srivastava et al. 2014) before the last layer: active in
    train mode, the identity in eval mode.
    """
    w = positive_int(width, "width")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout is a probability in [0, 1), got {dropout!r}")
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, w, 14, 14)
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 2w, 7, 7)
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 2w, 3, 3)
        nn.Flatten(), nn.Dropout(float(dropout)),  # (N, 18w)
        nn.Linear(2 * w * 9, positive_int(num_classes, "num_classes")),  # (N, K) logits
    )


class FlipShift:
    """Data augmentation: random left-right flips and shifts of up to ``max_shift`` pixels (zero fill).

    Called as ``augment(x, generator)`` on a training batch (N, C, H, W); draws come from the
    generator, so a seeded :func:`fit` gives the same batches every run.
    """

    def __init__(self, max_shift: int = 2, flip: bool = True):
        self.max_shift = positive_int(max_shift, "max_shift", minimum=0)
        self.flip = bool(flip)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, s = x.shape[0], self.max_shift
        if self.flip:
            flip = torch.rand(n, generator=generator, device="cpu") < 0.5  # (N,)
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        if s:
            padded = F.pad(x, (s, s, s, s))  # (N, C, H+2s, W+2s)
            dy, dx = (torch.randint(0, 2 * s + 1, (2,), generator=generator, device="cpu")).tolist()  # one shift per batch
            x = padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
        return x

    def __repr__(self) -> str:
        return f"FlipShift(max_shift={self.max_shift}, flip={self.flip})"


# ----------------------------------------------------------------------------------------------
# history and callbacks


@dataclass
class History:
    """Per-epoch loss and accuracy on the training and validation data (the training numbers are the
    running means over the epoch's batches, in train mode, as Keras reports them)."""

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    best_epoch: int | None = None  # 1-based epoch whose weights the model holds after early stopping
    stopped_early: bool = False
    seconds: float = 0.0

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    def row(self, epoch: int) -> dict[str, float]:
        """The numbers of a 1-based ``epoch``."""
        i = epoch - 1
        return {"train_loss": self.train_loss[i], "train_acc": self.train_acc[i],
                "val_loss": self.val_loss[i], "val_acc": self.val_acc[i]}


class Callback:
    """Hooks :func:`fit` calls: ``on_train_begin(model, history)``, ``on_epoch_end(epoch, model, history)``
    (return True to stop), ``on_train_end(model, history)``."""

    def on_train_begin(self, model: nn.Module, history: History) -> None:
        pass

    def on_epoch_end(self, epoch: int, model: nn.Module, history: History) -> bool:
        return False

    def on_train_end(self, model: nn.Module, history: History) -> None:
        pass


class EarlyStopping(Callback):
    """Stop when the validation loss has not improved by ``min_delta`` for ``patience`` epochs and put
    back the weights of the best epoch (Prechelt 1998; Keras' ``restore_best_weights=True``).

    ``monitor`` is ``"val_loss"`` (lower is better) or ``"val_acc"`` (higher is better).
    """

    def __init__(self, patience: int = 3, min_delta: float = 0.0, monitor: str = "val_loss", restore_best: bool = True):
        if monitor not in ("val_loss", "val_acc"):
            raise ValueError(f"monitor must be 'val_loss' or 'val_acc', got {monitor!r}")
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.patience, self.min_delta = positive_int(patience, "patience"), float(min_delta)
        self.monitor, self.restore_best = monitor, bool(restore_best)

    def on_train_begin(self, model, history) -> None:
        self.best, self.best_epoch, self.wait, self.best_state = math.inf, 0, 0, None

    @reference  # exercise training.early_stopping
    def on_epoch_end(self, epoch, model, history) -> bool:
        value = getattr(history, self.monitor)[-1]
        score = value if self.monitor == "val_loss" else -value  # lower is better
        if score < self.best - self.min_delta:  # an improvement: remember these weights
            self.best, self.best_epoch, self.wait = score, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.wait += 1
        return self.wait >= self.patience

    def on_train_end(self, model, history) -> None:
        history.best_epoch = self.best_epoch
        if self.restore_best and self.best_state is not None:
            model.load_state_dict(self.best_state)


class LivePlot(Callback):
    """Redraw the learning curves after every epoch (in Jupyter); one static figure at the end otherwise.

    With ``COURSEKIT_STATIC=1`` (headless runs, ``make course``) only the final figure is drawn.
    """

    def __init__(self, title: str = "learning curves"):
        self.title = title

    def on_epoch_end(self, epoch, model, history) -> bool:
        import os

        if os.environ.get("COURSEKIT_STATIC", "").strip().lower() not in ("1", "true", "yes"):
            import matplotlib.pyplot as plt
            from IPython.display import clear_output, display

            fig = plot_history(history, title=f"{self.title} (epoch {epoch})")
            clear_output(wait=True)
            display(fig)
            plt.close(fig)
        return False

    def on_train_end(self, model, history) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import clear_output, display

        fig = plot_history(history, title=self.title)
        clear_output(wait=True)
        display(fig)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the loop


@reference  # exercise training.evaluate
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode (mode put back).

    ``batch_size`` 250: on one CPU thread the small CNN evaluates 1000 images in 0.14 s at batch 250
    and 0.22-0.25 s at batch 1000 (measured on the course machine, 2026-12-07).

    Eval mode matters: in train mode dropout drops units at random and BatchNorm normalises with the
    batch's statistics (and overwrites its running averages), so the numbers would be neither
    repeatable nor those of the deployed model.
    """
    check_model(model)
    x, y = _check_data(x, y, "x")
    batch_size = positive_int(batch_size, "batch_size")
    modes = [m.training for m in model.modules()]
    device = model_device(model)
    total_loss, correct = 0.0, 0
    try:
        model.eval()
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            logits = model(xb)  # (B, K)
            total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        for m, t in zip(model.modules(), modes):
            m.training = t
    return total_loss / len(y), correct / len(y)


def _check_data(x, y, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{what} and its labels must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"{what} must be a float tensor (N, ...), got dtype {x.dtype} and shape {tuple(x.shape)}")
    if y.dim() != 1 or y.dtype != torch.long or len(y) != len(x):
        raise ValueError(f"the labels of {what} must be int64 class indices of shape ({len(x)},), "
                         f"got dtype {y.dtype} and shape {tuple(y.shape)}")
    if len(y) == 0:
        raise ValueError(f"{what} is empty")
    return x, y


def _check_fit_args(model, train, val, epochs, lr, batch_size, callbacks, augment):
    check_model(model)
    for name, part in (("train", train), ("val", val)):
        if not (isinstance(part, (tuple, list)) and len(part) == 2):
            raise TypeError(f"{name} must be a pair (x, y) of tensors, got {type(part).__name__}")
        _check_data(*part, f"{name}[0]")
    positive_int(epochs, "epochs"), positive_int(batch_size, "batch_size")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be coursekit.fit.Callback objects (e.g. EarlyStopping()), got {cb!r}")
    if augment is not None and not callable(augment):
        raise TypeError(f"augment must be a function (x, generator) -> x such as FlipShift(), got {augment!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train "
                         "(coursekit.load_model freezes its networks; a head needs trainable parameters)")
    return params


@contextlib.contextmanager
def _restored_on_error(model: nn.Module):
    """Every value, mode and requires_grad flag of ``model`` put back if the block raises."""
    values = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    flags = [(p.requires_grad, p.grad) for p in model.parameters()]
    try:
        yield
    except Exception:
        model.load_state_dict(values)
        for m, t in zip(model.modules(), modes):
            m.training = t
        for p, (g, grad) in zip(model.parameters(), flags):
            p.requires_grad_(g)
            p.grad = grad
        raise


@reference  # exercise training.train_step
def train_epoch(model, optimizer, x, y, batch_size, augment, gen) -> tuple[float, float]:
    """One pass over ``(x, y)`` in shuffled batches, in train mode; returns (mean loss, accuracy)."""
    device = model_device(model)
    model.train()
    order = torch.randperm(len(y), generator=gen, device="cpu")  # a new shuffle every epoch
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        idx = order[i:i + batch_size]
        xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment(xb, gen)  # training batches only, never validation data
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb)  # (B, K)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)  # the previous batch's gradient must not add to this one
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(y), correct / len(y)


@reference  # exercises training.train_step and training.train_head
def fit(model: nn.Module, train: tuple, val: tuple, *, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64,
        callbacks: Sequence[Callback] = (), augment: Callable | None = None, weight_decay: float = 0.0,
        seed: int = 0, progress: bool = True, desc: str = "fit") -> History:
    """Train ``model`` with Adam on ``train = (x, y)``; evaluate on ``val = (x, y)`` after every epoch.

    Parameters
    ----------
    model : nn.Module
        Returns logits (N, K). Only parameters with ``requires_grad=True`` are optimised (a frozen
        backbone stays out of the optimiser).
    train, val : (Tensor (N, ...), Tensor (N,) int64)
    epochs, lr, batch_size, weight_decay : training hyper-parameters (Adam; Kingma & Ba 2015).
    callbacks : sequence of Callback
        E.g. ``[EarlyStopping(patience=3), LivePlot()]``.
    augment : callable ``(x, generator) -> x``, optional
        Applied to every training batch (e.g. :class:`FlipShift`), never to validation data.
    seed : int
        Seeds shuffling, augmentation and dropout: the same call gives the same history.

    Returns
    -------
    History
        The model keeps its trained (or, with early stopping, best) weights and ends in the mode it
        came in. On an error every weight, buffer, mode and flag is put back before it is raised.
    """
    callbacks = list(callbacks)
    params = _check_fit_args(model, train, val, epochs, lr, batch_size, callbacks, augment)
    x, y = train
    history, gen, was_training = History(), cpu_generator(seed), model.training
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    start = time.perf_counter()
    with _restored_on_error(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        for cb in callbacks:
            cb.on_train_begin(model, history)
        for epoch in progress_bar(range(1, epochs + 1), progress=progress, desc=desc, unit="epoch", leave=False):
            loss, acc = train_epoch(model, optimizer, x, y, batch_size, augment, gen)
            history.train_loss.append(loss)
            history.train_acc.append(acc)
            for name, value in zip(("val_loss", "val_acc"), evaluate(model, *val)):
                getattr(history, name).append(value)
            stop = [cb.on_epoch_end(epoch, model, history) for cb in callbacks]  # every callback sees every epoch
            if any(stop):
                history.stopped_early = True
                break
        for cb in callbacks:
            cb.on_train_end(model, history)
        model.train(was_training)
    for p in params:
        p.grad = None
    history.seconds = time.perf_counter() - start
    return history


# ----------------------------------------------------------------------------------------------
# transfer learning: a frozen ImageNet backbone and a small head


class FrozenFeatures(nn.Module):
    """An ImageNet :class:`coursekit.models.CourseModel` as a frozen feature extractor for small grey images.

    ``(N, 1, 28, 28)`` in [0, 1] -> grey copied to the backbone's 3 channels -> resized to
    ``size`` x ``size`` -> the backbone's own normalisation -> its pooled penultimate features ``(N, D)``.
    The backbone's parameters have ``requires_grad=False`` and it stays in eval mode whatever
    ``.train()`` says, so its BatchNorm running statistics never move (a "frozen" model in train
    mode would keep updating them). Gradients still flow to the *input*, so attacks work.
    """

    def __init__(self, backbone: nn.Module, size: int = 64):
        super().__init__()
        if not hasattr(backbone, "normalize") or not hasattr(backbone.net, "forward_features"):
            raise TypeError("backbone must be a coursekit ImageNet model with a timm network, such as "
                            f"coursekit.load_model('efficientnet_lite0'); got {type(backbone).__name__}")
        self.size = positive_int(size, "size", minimum=16)
        self.backbone = backbone.requires_grad_(False).eval()
        self.channels = backbone.input_size[0]

    def train(self, mode: bool = True) -> FrozenFeatures:
        self.training = bool(mode)
        self.backbone.eval()  # always: its BatchNorm statistics stay those of ImageNet
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) in [0, 1] -> (N, D)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)  # grey -> RGB
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        net = self.backbone.net
        return net.forward_head(net.forward_features(self.backbone.normalize(x)), pre_logits=True)


class TransferNet(nn.Module):
    """``head(features(x))``: a frozen :class:`FrozenFeatures` and a trainable head."""

    def __init__(self, features: FrozenFeatures, head: nn.Module):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 28, 28) -> (N, K)
        return self.head(self.features(x))


def transfer_model(backbone: nn.Module | str = "efficientnet_lite0", num_classes: int = 10, hidden: int = 128,
                   dropout: float = 0.0, size: int = 64, seed: int = 0,
                   device: str | torch.device | None = None) -> TransferNet:
    """A frozen ImageNet backbone plus a head ``Linear(D, hidden) - ReLU - Dropout - Linear(hidden, K)``
    (the classic recipe of a frozen VGG16 and a new dense head; Yosinski et al. 2014, "How
    transferable are features in deep neural networks?"). ``hidden=0``: a linear head.

    ``device``: where a backbone given by name is loaded (:func:`coursekit.load_model`; ``None``: its
    default, the CPU). The head is made on the CPU from ``seed`` (the same weights on every device)
    and moved to the backbone's device."""
    if isinstance(backbone, str):
        from .models import load_model

        backbone = load_model(backbone) if device is None else load_model(backbone, device=device)
    elif device is not None:
        raise ValueError("device only applies to a backbone given by name; move a model with .to(device)")
    features = FrozenFeatures(backbone, size)
    dim = backbone.net.num_features
    hidden = positive_int(hidden, "hidden", minimum=0)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout is a probability in [0, 1), got {dropout!r}")
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # drawn on the CPU: the same head everywhere
        torch.manual_seed(seed)
        k = positive_int(num_classes, "num_classes")
        head = (nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(float(dropout)), nn.Linear(hidden, k))
                if hidden else nn.Linear(dim, k))
    return TransferNet(features, head.to(model_device(backbone)))


@torch.no_grad()
def extract_features(features: nn.Module, x: torch.Tensor, batch_size: int = 50, progress: bool = True) -> torch.Tensor:
    """``features(x)`` in batches, in eval mode: (N, D). A frozen backbone's features do not change
    during training, so computing them once and training the head on them is the same as training
    the whole :class:`TransferNet` (without augmentation), and many times faster.

    ``batch_size`` 50: EfficientNet-Lite0 at 48 x 48 on one CPU thread took 0.9 s per 500 images at
    batch 50, 1.2-1.3 s at 100 and 1.3-1.4 s at 250 (measured on the course machine, 2026-12-07).
    ``x`` may be on the CPU: each batch is moved to the model's device, where the features are returned."""
    check_model(features)
    batch_size = positive_int(batch_size, "batch_size")
    device = model_device(features)
    was = features.training
    features.eval()
    try:
        out = [features(x[i:i + batch_size].to(device))
               for i in progress_bar(range(0, len(x), batch_size), progress=progress, desc="features", leave=False)]
    finally:
        features.train(was)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# reading the results


@torch.no_grad()
def confusion_matrix(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> np.ndarray:
    """``C[i, j]`` = number of images of true class i predicted as j (eval mode, mode put back)."""
    check_model(model)
    x, y = _check_data(x, y, "x")
    was = [m.training for m in model.modules()]
    model.eval()
    try:
        pred = torch.cat([model(x[i:i + 250].to(model_device(model))).argmax(1).cpu() for i in range(0, len(y), 250)])
    finally:
        for m, t in zip(model.modules(), was):
            m.training = t
    y = y.cpu()  # labels may live on the model's device
    k = int(num_classes or max(int(y.max()), int(pred.max())) + 1)
    return np.bincount(y.numpy() * k + pred.numpy(), minlength=k * k).reshape(k, k)


def plot_history(history: History, axes=None, title: str = "learning curves", label: str = ""):
    """Loss and accuracy per epoch, training dashed and validation solid; the best epoch marked."""
    import matplotlib.pyplot as plt

    if not isinstance(history, History):
        raise TypeError(f"history must be a coursekit.fit.History (what fit returns), got {type(history).__name__}")
    fig = None
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    epochs = range(1, history.epochs + 1)
    prefix = f"{label} " if label else ""
    for ax, key, name in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        line, = ax.plot(epochs, getattr(history, "train_" + key), "--", label=f"{prefix}train")
        ax.plot(epochs, getattr(history, "val_" + key), "-", color=line.get_color(), label=f"{prefix}validation")
        if history.best_epoch:
            ax.axvline(history.best_epoch, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    axes[0].set_title(f"{title}: loss")
    axes[1].set_title(f"{title}: accuracy")
    return fig if fig is not None else axes[0].figure


def plot_confusion(matrix: np.ndarray, ax=None, classes: Sequence[str] = FASHION_CLASSES, title: str = "confusion matrix"):
    """A confusion matrix as an image with its counts written in; rows true classes, columns predictions."""
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(classes):
        raise ValueError(f"matrix must be square with one row per class ({len(classes)}), got shape {matrix.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4.5), constrained_layout=True)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title} (accuracy {np.trace(matrix) / matrix.sum():.1%})")
    return ax
