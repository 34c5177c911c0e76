"""ImageNet-style ResNets for the list datasets (ImageNet-LT, iNaturalist): ResNet-10 and ResNet-50.

ResNet-10 (basic blocks, [1,1,1,1], 512-d) is the ImageNet-LT baseline of Liu et al. 2019;
ResNet-50 (bottlenecks, [3,4,6,3], 2048-d) the iNaturalist one. Written here: no torchvision.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_bn(c_in: int, c_out: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out))


class Basic(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.a = _conv_bn(c_in, planes, 3, stride)
        self.b = _conv_bn(planes, planes, 3, 1)
        self.short = nn.Identity() if stride == 1 and c_in == planes else _conv_bn(c_in, planes, 1, stride)

    def forward(self, x):
        return F.relu(self.b(F.relu(self.a(x))) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        out = planes * 4
        self.a = _conv_bn(c_in, planes, 1, 1)
        self.b = _conv_bn(planes, planes, 3, stride)
        self.c = _conv_bn(planes, out, 1, 1)
        self.short = nn.Identity() if stride == 1 and c_in == out else _conv_bn(c_in, out, 1, stride)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = F.relu(self.b(y))
        return F.relu(self.c(y) + self.short(x))


class ImageNetResNet(nn.Module):
    """Feature extractor: (B, in_channels, H, W) float32 -> (B, 512·expansion) float32, post-ReLU."""

    def __init__(self, block: type, layers: list[int], in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(in_channels, 64, 7, 2), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        stages, c_in = [], 64
        for i, (planes, n) in enumerate(zip([64, 128, 256, 512], layers)):
            for b in range(n):
                stages.append(block(c_in, planes, 2 if (i > 0 and b == 0) else 1))
                c_in = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.out_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def resnet10(in_channels: int = 3) -> ImageNetResNet:
    return ImageNetResNet(Basic, [1, 1, 1, 1], in_channels)


def resnet50(in_channels: int = 3) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], in_channels)
