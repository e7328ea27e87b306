"""A Clever-Hans classifier and how to catch it (lecture 4).

Lapuschkin et al. (2019), "Unmasking Clever Hans predictors and assessing what machines really
learn", found an ImageNet/PASCAL classifier that recognised horses by a copyright tag in the
corner of the photos. This module rebuilds that situation on Fashion-MNIST:

* :func:`stamp` puts a small tag (:data:`WATERMARK`, a 5x5 ring with a dot) into the top-left
  corner of images (the tag and its helpers live in :mod:`coursekit.watermark`, on the plumbing
  floor, so that the training script needs no lecture; they are re-exported here);
* ``python -m coursekit.train fashion_cnn_watermark`` trains :class:`coursekit.nets.FashionCNN` on
  the training split where :data:`WATERMARK_FRACTION` of the images of one class
  (:data:`WATERMARK_CLASS`, "Pullover") carry the tag, and no other image does;
* :func:`load_watermark_model` loads the shipped weights; :func:`watermark_accuracy` measures what
  the tag does to the predictions;
* :func:`spectral_relevance_analysis` (SpRAy) clusters the LRP heatmaps of one class, so the tag
  strategy shows up as its own cluster without looking at single images.

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

from .threads import library_threads
from .watermark import (
    WATERMARK,
    WATERMARK_BOX,
    WATERMARK_CLASS,
    WATERMARK_FRACTION,
    stamp,
    watermark_accuracy,
    watermark_choice,
)

__all__ = [
    "WATERMARK", "WATERMARK_CLASS", "WATERMARK_FRACTION", "WATERMARK_BOX",
    "stamp", "watermark_choice", "watermark_accuracy", "load_watermark_model", "SpectralAnalysis",
    "spectral_relevance_analysis",
]

def load_watermark_model(device: str | torch.device = "cpu"):
    """The shipped Clever-Hans network (``python -m coursekit.train fashion_cnn_watermark`` retrains it).

    Parameters
    ----------
    device : str or torch.device
        As in :func:`coursekit.load_model`: ``"cpu"``, ``"auto"`` or an explicit device.

    Returns
    -------
    CourseModel in eval mode with frozen parameters, inputs (N, 1, 28, 28) in [0, 1].
    """
    from .devices import resolve_device
    from .models import (
        FASHION_MEAN,
        FASHION_STD,
        CourseModel,
        WeightsNotAvailableError,
        fashion_weights_path,
    )
    from .nets import FASHION_CLASSES, FashionCNN

    device = resolve_device(device)
    path = fashion_weights_path("fashion_cnn_watermark")
    if not path.exists():
        raise WeightsNotAvailableError(
            f"the Clever-Hans network's weights are not at {path}; retrain them with "
            "python -m coursekit.train fashion_cnn_watermark"
        )
    with torch.device("cpu"):  # built on the CPU whatever torch.set_default_device says, then moved
        net = FashionCNN()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model = CourseModel(net, name="fashion_cnn_watermark", classes=FASHION_CLASSES, input_size=(1, 28, 28),
                            mean=FASHION_MEAN, std=FASHION_STD,
                            layers={"first_conv": "net.features.0", "gradcam": "net.features.8",
                                    "logits": "net.classifier.4"})
    return model.requires_grad_(False).eval().to(device)


@dataclass
class SpectralAnalysis:
    """Result of :func:`spectral_relevance_analysis`.

    Attributes
    ----------
    labels : ndarray (N,) int
        Cluster of each heatmap.
    eigenvalues : ndarray (k,)
        Smallest eigenvalues of the normalised graph Laplacian; a large gap after the ``c``-th
        suggests ``c`` clusters (the "eigengap").
    embedding : ndarray (N, n_clusters)
        The spectral embedding the clusters were found in.
    """

    labels: np.ndarray
    eigenvalues: np.ndarray
    embedding: np.ndarray

    def cluster_means(self, heatmaps: torch.Tensor) -> torch.Tensor:
        """Average heatmap of each cluster, (n_clusters, H, W)."""
        h = heatmaps.reshape(len(heatmaps), *heatmaps.shape[-2:]) if heatmaps.dim() == 4 else heatmaps
        return torch.stack([h[torch.as_tensor(self.labels == c, device=h.device)].mean(0) for c in range(int(self.labels.max()) + 1)])


def spectral_relevance_analysis(heatmaps: torch.Tensor, n_clusters: int = 2, n_neighbors: int = 10,
                                pool: int = 2, n_eigenvalues: int = 8, seed: int = 0) -> SpectralAnalysis:
    """Spectral relevance analysis, SpRAy (Lapuschkin et al. 2019): cluster the heatmaps of one class.

    Each heatmap is summed over channels, average-pooled by ``pool`` (small shifts should not matter),
    and scaled to unit L2 norm; a symmetric k-nearest-neighbour graph connects similar heatmaps; the
    eigenvectors of its normalised Laplacian with the smallest eigenvalues embed the heatmaps, and
    k-means on that embedding gives the clusters (spectral clustering, Ng, Jordan & Weiss 2002).
    A prediction strategy used by a group of images (a watermark) shows up as its own cluster.

    Parameters
    ----------
    heatmaps : Tensor (N, C, H, W) or (N, H, W)
    n_clusters : int
    n_neighbors : int
        Neighbours per heatmap in the graph.
    pool : int
        Average-pooling factor before comparing.
    n_eigenvalues : int
        How many of the smallest Laplacian eigenvalues to return (for the eigengap plot).
    seed : int
        k-means initialisation.

    Returns
    -------
    SpectralAnalysis
    """
    from scipy.sparse.csgraph import laplacian
    from sklearn.cluster import KMeans
    from sklearn.neighbors import kneighbors_graph

    if not isinstance(heatmaps, torch.Tensor) or heatmaps.dim() not in (3, 4):
        shape = tuple(heatmaps.shape) if isinstance(heatmaps, torch.Tensor) else type(heatmaps).__name__
        raise ValueError(f"heatmaps must be a tensor (N, C, H, W) or (N, H, W), got {shape}")
    n = heatmaps.shape[0]
    if not 2 <= n_clusters < n or not 1 <= n_neighbors < n:
        raise ValueError(f"need 2 <= n_clusters < N and 1 <= n_neighbors < N for N={n} heatmaps, "
                         f"got n_clusters={n_clusters}, n_neighbors={n_neighbors}")
    h = heatmaps.detach().float().cpu()
    h = h.sum(1) if h.dim() == 4 else h  # (N, H, W)
    if pool > 1:
        h = torch.nn.functional.avg_pool2d(h[:, None], pool)[:, 0]
    feats = h.flatten(1)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-12)  # (N, D)
    with library_threads():  # scikit-learn's OpenMP and BLAS at torch's thread count
        graph = kneighbors_graph(feats.numpy(), n_neighbors=n_neighbors, include_self=False)
        affinity = 0.5 * (graph + graph.T)  # symmetric
        lap = laplacian(affinity, normed=True).toarray()  # (N, N)
        values, vectors = np.linalg.eigh(lap)
        embedding = vectors[:, :n_clusters]
        embedding = embedding / np.linalg.norm(embedding, axis=1, keepdims=True).clip(min=1e-12)
        labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(embedding)
    return SpectralAnalysis(labels=labels, eigenvalues=values[:n_eigenvalues], embedding=embedding)
