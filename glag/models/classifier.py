"""A backbone + linear head, and the factory ``create_model``."""
from __future__ import annotations

import torch
import torch.nn as nn

from .resnet_cifar import CifarResNet
from .resnet_imagenet import resnet10, resnet50

ARCHS = ("resnet32", "resnet20", "resnet44", "resnet56", "resnet10", "resnet50")


class Classifier(nn.Module):
    """``head(features(x))``: features (B, d) float32 post-ReLU, logits (B, C) float32."""

    def __init__(self, features: nn.Module, num_classes: int, arch: str):
        super().__init__()
        self.arch = arch
        self.features = features
        self.feature_dim = features.out_dim
        self.num_classes = num_classes
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, d), logits (B, C)) in one pass: what extraction stores."""
        f = self.features(x)
        return f, self.head(f)


def create_model(arch: str, num_classes: int, in_channels: int = 3) -> Classifier:
    """Build ``arch`` (one of :data:`ARCHS`) for ``num_classes`` classes and ``in_channels`` input planes.

    resnet20/32/44/56: the CIFAR ResNet (64-d feature; any input size, e.g. 1×28×28 Fashion-MNIST).
    resnet10/50: ImageNet-style (512-d / 2048-d feature) for the list datasets.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch in ("resnet10", "resnet50"):
        backbone = (resnet10 if arch == "resnet10" else resnet50)(in_channels)
    else:
        backbone = CifarResNet(int(arch[len("resnet"):]), in_channels)
    return Classifier(backbone, num_classes, arch)
