"""Architectures the course trains itself.

``FashionCNN`` is deliberately plain: conv-ReLU-pool blocks and a small MLP head, no
batch-norm and no residual connections, so that every lecture method (LRP in particular)
applies to it without special cases.
"""

from __future__ import annotations

import torch
from torch import nn

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class FashionCNN(nn.Module):
    """A small VGG-style network for 28x28 grey images (Fashion-MNIST).

    Layer names are stable; lectures refer to them:
    ``features.0`` (first conv), ``features.7`` (last conv), ``features.8`` (its ReLU, the
    default Grad-CAM layer), ``classifier.2`` (penultimate ReLU),
    ``classifier.4`` (logits).
    """

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),  # 0   (N, w, 28, 28)
            nn.ReLU(),  # 1
            nn.Conv2d(w, w, 3, padding=1),  # 2   (N, w, 28, 28)
            nn.ReLU(),  # 3
            nn.MaxPool2d(2),  # 4   (N, w, 14, 14)
            nn.Conv2d(w, 2 * w, 3, padding=1),  # 5   (N, 2w, 14, 14)
            nn.ReLU(),  # 6
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),  # 7   (N, 2w, 14, 14)
            nn.ReLU(),  # 8
            nn.MaxPool2d(2),  # 9   (N, 2w, 7, 7)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # 0   (N, 2w*7*7)
            nn.Linear(2 * w * 7 * 7, 128),  # 1
            nn.ReLU(),  # 2   penultimate features (N, 128)
            nn.Dropout(0.25),  # 3   identity in eval mode
            nn.Linear(128, num_classes),  # 4   logits (N, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N,1,28,28) -> (N,10)
        return self.classifier(self.features(x))
