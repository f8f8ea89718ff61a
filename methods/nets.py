"""Backbones and MLP heads.

- resnet18_cifar / resnet34_cifar: torchvision ResNets with the CIFAR stem
  (3x3 stride-1 first convolution, no max-pool), 512-d output.
- resnet18_imagenet / resnet34_imagenet: the standard stem (7x7 stride 2 + max-pool), for 96 and 224 px.
- small_cnn: a 4-block convnet that trains in minutes on two CPU cores (digits).
Every backbone maps (N, C, H, W) -> (N, feat_dim) and carries `feat_dim`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class _ResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, cifar_stem: bool):
        super().__init__()
        import torchvision

        net = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34}[depth](weights=None)
        if cifar_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.net = net
        self.feat_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def resnet18_cifar(in_channels: int = 3, **_) -> nn.Module:
    return _ResNet(18, in_channels, cifar_stem=True)


def resnet34_cifar(in_channels: int = 3, **_) -> nn.Module:
    return _ResNet(34, in_channels, cifar_stem=True)


def resnet18_imagenet(in_channels: int = 3, **_) -> nn.Module:
    return _ResNet(18, in_channels, cifar_stem=False)


def resnet34_imagenet(in_channels: int = 3, **_) -> nn.Module:
    return _ResNet(34, in_channels, cifar_stem=False)


class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks (width w, 2w, 4w, 8w), a max-pool after each of the first three, global average pool."""

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x)).flatten(1)


def small_cnn(in_channels: int = 1, width: int = 32, **_) -> nn.Module:
    return SmallCNN(in_channels, width)


def build_backbone(name: str, in_channels: int, width: int = 32) -> nn.Module:
    from methods import BACKBONES

    return BACKBONES.get(name)(in_channels=in_channels, width=width)


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear: BYOL's projector and predictor."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))
