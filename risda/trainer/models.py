"""Backbones that return (features, logits): ResNet-32 for 32x32 CIFAR, ResNet-50 for 224x224.

ResNet-32 follows He et al. (2016) section 4.2 as used by LDAM-DRW, ISDA and RISDA:
3 stages x 5 basic blocks, 16/32/64 channels, option-A (parameter-free) shortcuts,
a 64-d feature and a linear classifier with bias.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..method.baselines import NormedLinear


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes if (stride != 1 or in_planes != planes) else 0
        self.stride = stride

    def shortcut(self, x):
        # Option A: subsample spatially, zero-pad the new channels (no parameters).
        if not self.pad and self.stride == 1:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, num_classes: int, blocks_per_stage: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                stages.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*stages)
        self.feature_dim = 64
        self.classifier = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.blocks(out)
        features = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return features, self.classifier(features)


def resnet32(num_classes: int) -> ResNetCifar:
    return ResNetCifar(num_classes, blocks_per_stage=5)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 (random init, nothing downloaded) with its 2048-d feature exposed."""

    def __init__(self, num_classes: int):
        super().__init__()
        import torchvision
        self.backbone = torchvision.models.resnet50(weights=None)
        self.backbone.fc = nn.Identity()
        self.feature_dim = 2048
        self.classifier = nn.Linear(2048, num_classes)

    def forward(self, x):
        features = self.backbone(x)
        return features, self.classifier(features)


def build_model(name: str, num_classes: int, normed_classifier: bool = False) -> nn.Module:
    """The backbone; normed_classifier swaps its linear classifier for NormedLinear (LDAM)."""
    if name == "resnet32":
        model = resnet32(num_classes)
    elif name == "resnet50":
        model = ResNet50(num_classes)
    else:
        raise ValueError(f"unknown model {name!r}: choose resnet32 or resnet50")
    if normed_classifier:
        model.classifier = NormedLinear(model.feature_dim, num_classes)
    return model
