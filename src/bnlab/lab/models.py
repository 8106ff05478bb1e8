"""Small reference networks shared by the lab and the benchmarks."""

from __future__ import annotations

from torch import Tensor, nn

from ..nn import BatchNorm1d, BatchNorm2d


class ResidualBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, + identity, ReLU; the second conv grouped."""

    def __init__(self, channels: int, groups: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)
        self.bn2 = BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(y)) + x).relu()


class SmallResNet(nn.Module):
    """A ResNet-style CNN: stem, residual blocks, a BN before a 1x1 conv, a ConvTranspose, a head.

    Every batch-norm placement that inference folding has to handle appears once.
    """

    def __init__(
        self, in_channels: int = 3, width: int = 32, blocks: int = 2, classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.stem_bn = BatchNorm2d(width)
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks)))
        self.pre_bn = BatchNorm2d(width)  # BN before a conv (no padding: foldable into it)
        self.squeeze = nn.Conv2d(width, width * 2, 1)
        self.up = nn.ConvTranspose2d(width * 2, width, 2, stride=2, groups=2)
        self.up_bn = BatchNorm2d(width)
        self.head = nn.Linear(width, classes, bias=False)
        self.head_bn = BatchNorm1d(classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_bn(self.stem(x)).relu()
        x = self.blocks(x)
        x = self.squeeze(self.pre_bn(x)).relu()
        x = self.up_bn(self.up(x)).relu()
        return self.head_bn(self.head(x.mean((2, 3))))


def bn_mlp(
    in_features: int = 784, hidden: int = 512, depth: int = 3, classes: int = 10
) -> nn.Sequential:
    """Linear-BN-ReLU x depth, then a Linear."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden, bias=False), BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, classes))
