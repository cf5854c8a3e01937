"""The architectures the papers train, by name, for recipes and ``--arch`` (``robench:NAME``).

* ``lenet``: the feature-alignment paper's LeNet for MNIST / Fashion-MNIST (Fig. 4: two
  convolutional layers, 5x5 kernels, then fully connected layers), 28x28 grayscale input.
* ``resnet18_cifar`` / ``resnet18_gray``: ResNet-18 for small images as the FDD paper trains it
  (512 neurons before the classifier, batch normalisation), with the usual small-image stem:
  a 3x3 convolution of stride 1 and no max-pooling; ``_gray`` takes one channel (Fashion-MNIST).
* ``resnet110_cifar``: He et al.'s CIFAR ResNet-110 (three stages of 18 basic blocks with
  16/32/64 channels), the feature-alignment paper's CIFAR-10 / STL-10 network.

Every network ends in adaptive average pooling, so STL-10's 96x96 images fit as well.
Module names matter to recipes (where a defence goes, which layers are aligned): ``stem``,
``layer1``..``layerN``, ``pool``, ``fc`` for the ResNets; ``conv1``, ``conv2``, ``fc1``..``fc3`` for LeNet.
"""

from __future__ import annotations

from torch import nn


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(7)  # 28x28 inputs are 7x7 here already
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 1024), nn.ReLU())
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x):
        return self.fc2(self.fc1(self.pool(self.conv2(self.conv1(x)))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class SmallImageResNet(nn.Module):
    """A ResNet of basic blocks for small images: 3x3 stem, no max-pooling, one stage per width."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        cin = widths[0]
        for i, (count, width) in enumerate(zip(blocks, widths), start=1):
            stride = 1 if i == 1 else 2
            layers = [BasicBlock(cin if j == 0 else width, width, stride if j == 0 else 1) for j in range(count)]
            self.add_module(f"layer{i}", nn.Sequential(*layers))
            cin = width
        self.stages = len(blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.pool(x))


def lenet(num_classes: int = 10) -> nn.Module:
    return LeNet(num_classes, in_channels=1)


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    return SmallImageResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels=3)


def resnet18_gray(num_classes: int = 10) -> nn.Module:
    return SmallImageResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels=1)


def resnet110_cifar(num_classes: int = 10) -> nn.Module:
    return SmallImageResNet([18, 18, 18], [16, 32, 64], num_classes, in_channels=3)


ZOO = {"lenet": lenet, "resnet18_cifar": resnet18_cifar, "resnet18_gray": resnet18_gray,
       "resnet110_cifar": resnet110_cifar}
