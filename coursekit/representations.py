"""What a layer responds to and what its representation keeps.

Lecture 2, the data side of "maximal response":

* :func:`top_activating` -- the dataset images (and their receptive-field patches) that excite a
  channel most (Zeiler & Fergus 2014; Karpathy's CS231n notes); the patches are cut with
  :func:`coursekit.receptive_fields.unit_windows`;
* :func:`invert_features` -- reconstruct a picture from a layer's features alone
  (Mahendran & Vedaldi 2015), with the same engine as :func:`coursekit.maximize.maximize`;
* :func:`layer_features`, :func:`embed` (PCA / t-SNE with scikit-learn), :func:`plot_embedding`;
* :func:`nearest_neighbours` in feature space versus pixel space, :func:`show_neighbours`.

Every function leaves the model exactly as it was and computes no weight gradient.

Devices: every function here computes on the model's device (:func:`coursekit.model_device`).
Images, labels and maps given on another device (a CPU image for a CUDA model) are moved there;
returned tensors live on the model's device, as in captum; numbers, numpy arrays and figures are on
the CPU. Seeded random numbers are drawn on the CPU and moved, so a seed gives the same draws on
every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ._reference import reference
from .batching import batches
from .geometry import UnitWindows, unit_windows
from .guard import guarded
from .hooks import get_layer, layer_outputs, record
from .image_params import fourier_image, pixel_image
from .inputs import check_images, check_model, positive_int
from .maximize import MaximizationResult, maximize
from .objectives import feature_match, per_image, relative_l2, total_variation
from .threads import library_threads

__all__ = [
    "DatasetExamples",
    "InversionResult",
    "embed",
    "invert_features",
    "layer_features",
    "nearest_neighbours",
    "plot_embedding",
    "show_neighbours",
    "top_activating",
]


@torch.no_grad()
def layer_features(model: nn.Module, images: torch.Tensor, layer, batch_size: int = 250, flatten: bool = True) -> torch.Tensor:
    """The output of ``layer`` for every image, computed in batches without gradients.

    The forward pass stops at ``layer``: later layers are not computed.

    Parameters
    ----------
    model : nn.Module
    images : Tensor (N, C, H, W)
    layer : str or nn.Module
        E.g. ``model.layers["penultimate"]``.
    batch_size : int
    flatten : bool
        Return ``(N, D)`` (default) instead of the layer's own shape.

    Returns
    -------
    Tensor (N, D) or (N, ...)
    """
    check_model(model)
    images = check_images(images, "images", model=model)
    batch_size = positive_int(batch_size, "batch_size")
    name, _ = get_layer(model, layer)
    out = []
    with guarded(model, what="layer_features"), layer_outputs(model, [name]) as extract, torch.no_grad():
        for start, stop in batches(images.shape[0], batch_size):
            a = extract(images[start:stop])[name]  # the forward pass stops at the layer
            out.append(a.flatten(1) if flatten else a)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# dataset examples


@dataclass
class DatasetExamples:
    """The images of a dataset that excite one channel most (see :func:`top_activating`).

    Attributes
    ----------
    layer : str
    channel : int
    indices : Tensor (k,)
        Dataset indices, strongest first.
    scores : Tensor (k,)
        The channel's maximum over positions for each of them.
    positions : Tensor (k, 2) or None
        ``(row, column)`` of that maximum in the layer's map (None for a fully connected layer).
    images : Tensor (k, C, H, W)
    patches : Tensor (k, C, h, w)
        The receptive-field window of the strongest unit (whole images for a fully connected layer);
        where the window reaches outside the image it is filled with 0.
    field : UnitWindows or None
        The input window of every unit of the layer (``.size``, ``.stride``, ``.box(i, j)``), from
        :func:`coursekit.receptive_fields.unit_windows`; None for a fully connected layer.
    """

    layer: str
    channel: int
    indices: torch.Tensor
    scores: torch.Tensor
    positions: torch.Tensor | None
    images: torch.Tensor
    patches: torch.Tensor
    field: UnitWindows | None

    def show(self, class_names=None, labels=None, ncols: int | None = None):
        """Top images (window outlined) above their patches; returns the figure."""
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        from .images import to_numpy_image

        k = len(self.indices)
        ncols = ncols or k
        fig, axes = plt.subplots(2, ncols, figsize=(1.3 * ncols, 3.0), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for n in range(k):
            im = to_numpy_image(self.images[n])
            ax = axes[0, n]
            ax.imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=1)
            title = f"#{int(self.indices[n])}\n{float(self.scores[n]):.2f}"
            if labels is not None and class_names is not None:
                title = f"{class_names[int(labels[int(self.indices[n])])]}\n{float(self.scores[n]):.2f}"
            ax.set_title(title, fontsize=7)
            if self.positions is not None and self.field is not None:
                top, left, h, w = self.field.box(*self.positions[n].tolist())
                ax.add_patch(Rectangle((left - 0.5, top - 0.5), w, h, fill=False, edgecolor="red", linewidth=1))
            p = to_numpy_image(self.patches[n])
            axes[1, n].imshow(p, cmap="gray" if p.ndim == 2 else None, vmin=0, vmax=1)
        axes[0, 0].text(-0.3, 0.5, "image", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
        axes[1, 0].text(-0.3, 0.5, "patch", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
        fig.suptitle(f"top {k} test images for channel {self.channel} of {self.layer}", fontsize=9)
        fig.tight_layout()
        return fig


@torch.no_grad()
def top_activating(model: nn.Module, images: torch.Tensor, layer, channel, k: int = 9, batch_size: int = 250):
    """The ``k`` images whose strongest response in ``channel`` of ``layer`` is largest.

    Score of an image = maximum of the channel's map over positions (for a fully connected layer,
    the unit's value). Ranked strongest first; ties go to the lower index. For a spatial layer the
    receptive-field patch of the strongest unit is cut out (Zeiler & Fergus 2014, Fig. 2). One
    pass over the data serves several channels, and it stops at ``layer``.

    Parameters
    ----------
    model : nn.Module
    images : Tensor (N, C, H, W)
        The dataset, e.g. Fashion-MNIST's test split.
    layer : str or nn.Module
    channel : int or list of int
    k : int
    batch_size : int

    Returns
    -------
    DatasetExamples, or a list of them (one per channel) when ``channel`` is a list
    """
    check_model(model)
    images = check_images(images, "images", model=model)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= images.shape[0]:
        raise ValueError(f"k must be an int between 1 and the number of images ({images.shape[0]}), got {k!r}")
    channels = [channel] if not isinstance(channel, (list, tuple)) else list(channel)
    if not channels or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in channels):
        raise TypeError(f"channel must be an int or a list of ints, got {channel!r}")
    channels = [int(c) for c in channels]
    batch_size = positive_int(batch_size, "batch_size")
    name, _ = get_layer(model, layer)
    scores, positions = [], []
    with guarded(model, what="top_activating"), layer_outputs(model, [name]) as extract, torch.no_grad():
        for start, stop in batches(images.shape[0], batch_size):
            a = extract(images[start:stop])[name]  # (B, K, h, w) or (B, K): the pass stops at the layer
            bad = [c for c in channels if not 0 <= c < a.shape[1]]
            if bad:
                raise ValueError(f"channel {bad[0]} out of range: layer {name!r} has {a.shape[1]} channels (0..{a.shape[1] - 1})")
            a = a[:, channels]  # (B, n_channels, h, w) or (B, n_channels)
            if a.dim() == 2:
                scores.append(a)
            else:
                flat = a.flatten(2)
                best, where = flat.max(2)  # (B, n_channels): first maximum in row-major order
                scores.append(best)
                positions.append(torch.stack([where // a.shape[3], where % a.shape[3]], 2))  # (B, n_channels, 2)
    scores = torch.cat(scores)  # (N, n_channels)
    field = unit_windows(model, name, input_size=tuple(images.shape[1:])) if positions else None
    all_pos = torch.cat(positions) if positions else None
    results = []
    for j, c in enumerate(channels):
        order = torch.sort(-scores[:, j], stable=True).indices[:k]  # descending, ties -> lower index
        chosen = images[order]
        if all_pos is not None:
            pos = all_pos[order, j]  # (k, 2)
            patches = torch.stack([field.crop(img, int(r), int(q)) for img, (r, q) in zip(chosen, pos)])
        else:
            pos, patches = None, chosen.clone()
        results.append(DatasetExamples(name, c, order, scores[order, j], pos, chosen, patches, field))
    return results if isinstance(channel, (list, tuple)) else results[0]


# ----------------------------------------------------------------------------------------------
# feature inversion


@dataclass
class InversionResult:
    """Reconstructions from the features of several layers (see :func:`invert_features`).

    Attributes
    ----------
    layers : list of str
    images : Tensor (L, C, H, W)
        One reconstruction per layer.
    feature_error : Tensor (L,)
        ``||phi(x_hat) - phi(x0)||^2 / ||phi(x0)||^2`` at the end.
    pixel_error : Tensor (L,)
        ``||x_hat - x0|| / ||x0||``: how far the picture is from the original.
    run : MaximizationResult
        The optimisation (its ``history`` is minus the objective, per layer).
    """

    layers: list
    images: torch.Tensor
    feature_error: torch.Tensor
    pixel_error: torch.Tensor
    run: MaximizationResult


def invert_features(
    model: nn.Module,
    image: torch.Tensor,
    layers,
    steps: int = 200,
    lr: float = 0.1,
    tv_weight: float = 0.5,
    parameterization: str = "fourier",
    seed: int = 0,
    progress: bool = True,
) -> InversionResult:
    """Reconstruct ``image`` from the features of each of ``layers`` (Mahendran & Vedaldi 2015).

    For layer ``l`` with features ``phi_0 = phi_l(image)``, start from noise and maximise
    ``-||phi_l(x) - phi_0||^2 / ||phi_0||^2 - tv_weight * mean TV(x)`` (TV = squared differences
    of neighbouring pixels, the beta = 2 prior of the paper). All layers are inverted together,
    one picture per layer, in one run of :func:`~coursekit.maximize.maximize`. What the
    reconstruction gets right is what the layer keeps; what comes back different is what it
    threw away (invariances).

    Parameters
    ----------
    model : nn.Module
    image : Tensor (1, C, H, W)
        The picture to reconstruct, in [0, 1].
    layers : str or list of str
    steps, lr : optimisation length and Adam learning rate.
    tv_weight : float
        Weight of the TV prior, per pixel.
    parameterization : {"fourier", "pixel"}
        The picture's parameterisation (:func:`~coursekit.maximize.fourier_image` converges in
        far fewer steps).
    seed : int
    progress : bool

    Returns
    -------
    InversionResult
    """
    check_model(model)
    image = check_images(image, "image", model=model)
    if image.shape[0] != 1:
        raise ValueError(f"invert_features reconstructs one picture, got a batch of {image.shape[0]}; pass image[i:i+1]")
    if parameterization not in ("pixel", "fourier"):
        raise ValueError(f"parameterization must be 'pixel' or 'fourier', got {parameterization!r}")
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    names = [get_layer(model, layer)[0] for layer in layers]
    if not names:
        raise ValueError("give at least one layer to invert")
    with torch.no_grad(), guarded(model, what="invert_features"), record(model, names) as rec:
        model(image)
        targets = {n: rec.activations[n].clone() for n in names}
    n_layers = len(names)
    _, c, h, w = image.shape
    shape = (n_layers, c, h, w)
    param = pixel_image(shape, sd=0.05, seed=seed) if parameterization == "pixel" else fourier_image(shape, seed=seed)
    tv = total_variation(2.0) * (tv_weight / (h * w))
    objective = per_image([feature_match(n, targets[n]) - tv for n in names])
    run = maximize(model, objective, param=param, steps=steps, lr=lr, seed=seed, progress=progress)
    x = run.image
    with torch.no_grad(), guarded(model, what="invert_features"), record(model, names) as rec:
        model(x)
        feature_error = torch.stack(
            [
                (rec.activations[n][i] - targets[n][0]).pow(2).sum() / targets[n].pow(2).sum().clamp_min(1e-12)
                for i, n in enumerate(names)
            ]
        )
    pixel_error = relative_l2(x, image.expand_as(x))
    return InversionResult(names, x, feature_error, pixel_error, run)


# ----------------------------------------------------------------------------------------------
# embeddings and neighbours


def embed(features: torch.Tensor, method: str = "pca", seed: int = 0, perplexity: float = 30.0, pca_dims: int = 50,
          max_iter: int = 500) -> np.ndarray:
    """2-d embedding of features ``(N, D)`` for plotting.

    ``"pca"``: the first two principal components (linear; keeps large distances).
    ``"tsne"``: t-SNE (van der Maaten & Hinton 2008) after PCA to ``pca_dims`` dimensions, PCA
    initialisation, fixed seed, ``max_iter`` iterations (keeps neighbourhoods; distances between
    clusters mean little).

    Returns
    -------
    ndarray (N, 2)
    """
    from sklearn.decomposition import PCA

    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] < 3:
        raise ValueError(f"features must be (N, D) with N >= 3, got shape {features.shape}")
    if method == "pca":
        with library_threads():
            return PCA(n_components=2, random_state=seed).fit_transform(features)
    if method == "tsne":
        from sklearn.manifold import TSNE

        with library_threads():  # scikit-learn's OpenMP and BLAS at torch's thread count
            if features.shape[1] > pca_dims:
                features = PCA(n_components=pca_dims, random_state=seed).fit_transform(features)
            perplexity = min(float(perplexity), (features.shape[0] - 1) / 3)
            return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                        max_iter=max_iter).fit_transform(features)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


def plot_embedding(points, labels, class_names=None, images=None, thumbnails: int = 40, ax=None, title: str | None = None,
                   seed: int = 0, zoom: float = 0.6):
    """Scatter a 2-d embedding coloured by class, with some images drawn at their points.

    Parameters
    ----------
    points : array (N, 2)
    labels : array or Tensor (N,) of class indices
    class_names : sequence of str, optional (legend)
    images : Tensor (N, C, H, W), optional
        Thumbnails of ``thumbnails`` randomly chosen points are drawn.
    """
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    from .images import to_numpy_image

    points = np.asarray(points)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if points.ndim != 2 or points.shape[1] != 2 or len(labels) != len(points):
        raise ValueError(f"points must be (N, 2) with one label each, got {points.shape} and {len(labels)} labels")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab10")
    for c in np.unique(labels):
        sel = labels == c
        name = class_names[int(c)] if class_names is not None else str(int(c))
        ax.scatter(points[sel, 0], points[sel, 1], s=4, color=cmap(int(c) % 10), label=name)
    if images is not None and thumbnails > 0:
        rng = np.random.default_rng(seed)
        for i in rng.choice(len(points), size=min(thumbnails, len(points)), replace=False):
            im = to_numpy_image(images[int(i)])
            box = OffsetImage(im, cmap="gray" if im.ndim == 2 else None, zoom=zoom)
            ax.add_artist(AnnotationBbox(box, points[i], frameon=True, pad=0.1, bboxprops={"edgecolor": cmap(int(labels[i]) % 10)}))
    ax.legend(fontsize=7, markerscale=3, loc="best")
    ax.set_xlabel("dimension 1")
    ax.set_ylabel("dimension 2")
    if title:
        ax.set_title(title)
    return ax


@reference
def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int = 5, metric: str = "euclidean") -> torch.Tensor:
    """Indices of the ``k`` rows of ``bank`` closest to each row of ``queries``, nearest first.

    Parameters
    ----------
    queries : Tensor (Q, D)
    bank : Tensor (M, D)
    k : int
    metric : {"euclidean", "cosine"}
        Euclidean distance, or cosine distance ``1 - cos(angle)``. Ties go to the lower index.

    Returns
    -------
    LongTensor (Q, k)
    """
    if not isinstance(queries, torch.Tensor) or not isinstance(bank, torch.Tensor):
        raise TypeError("queries and bank must be tensors (Q, D) and (M, D)")
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries and bank must be (Q, D) and (M, D) with the same D, got {tuple(queries.shape)} and {tuple(bank.shape)}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be an int between 1 and len(bank) = {bank.shape[0]}, got {k!r}")
    q, b = queries.double(), bank.double()
    if metric == "euclidean":
        d = torch.cdist(q, b)  # (Q, M)
    elif metric == "cosine":
        d = 1 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    else:
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    return torch.sort(d, dim=1, stable=True).indices[:, :k]


def show_neighbours(query_images: torch.Tensor, bank_images: torch.Tensor, neighbours: dict, labels=None, class_names=None,
                    bank_labels=None, size: float = 1.1):
    """One row per query: the query, then its neighbours from each ``{title: (Q, k) indices}`` side by side.

    Titles show class names when ``labels`` (of the queries) / ``bank_labels`` and ``class_names`` are
    given; a neighbour of another class than its query has a red title. Returns the figure.
    """
    import matplotlib.pyplot as plt

    from .images import to_numpy_image

    sets = list(neighbours.items())
    if not sets:
        raise ValueError("give at least one set of neighbours, e.g. {'feature space': idx}")
    q = query_images.shape[0]
    k = sets[0][1].shape[1]
    if any(tuple(idx.shape) != (q, k) for _, idx in sets):
        raise ValueError(f"every set of neighbours must have shape (Q, k) = ({q}, {k})")
    ncols = 1 + len(sets) * k
    fig, axes = plt.subplots(q, ncols, figsize=(size * ncols, size * q + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])

    def name(lbls, i):
        if lbls is None or class_names is None:
            return ""
        return class_names[int(lbls[i])]

    def draw(ax, im):
        im = to_numpy_image(im)
        ax.imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=1)

    for qi in range(q):
        draw(axes[qi, 0], query_images[qi])
        axes[qi, 0].set_title(f"query\n{name(labels, qi)}", fontsize=7)
        for si, (title, idx) in enumerate(sets):
            for j in range(k):
                ax = axes[qi, 1 + si * k + j]
                b = int(idx[qi, j])
                draw(ax, bank_images[b])
                same = labels is None or bank_labels is None or int(bank_labels[b]) == int(labels[qi])
                head = f"{title} {j + 1}\n" if qi == 0 else ""
                ax.set_title(head + name(bank_labels, b), fontsize=7, color="black" if same else "red")
    fig.tight_layout()
    return fig
