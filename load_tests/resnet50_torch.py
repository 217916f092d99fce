"""ResNet-50 in plain PyTorch (no torchvision): the torchvision ``resnet50`` architecture, random weights.

Same layers, shapes and state_dict names as torchvision's ResNet-50 (v1.5: the stride of a stage's
first block sits on its 3x3 convolution), so its 25,557,032 parameters line up one for one:

* stem: conv 7x7/2 (3 -> 64, no bias), BatchNorm, ReLU, max pool 3x3/2;
* four stages of Bottleneck blocks, [3, 4, 6, 3] blocks of widths 64, 128, 256, 512, expansion 4
  (1x1 conv -> 3x3 conv -> 1x1 conv to 4 x width, BatchNorm after each, ReLU; a 1x1 conv +
  BatchNorm on the shortcut where the shape changes), strides 1, 2, 2, 2;
* global average pool, fully connected 2048 -> 1000.

Any input size of at least 32x32 works (the pool is adaptive). This file has no imports but torch:
``load_tests.bench_pytorch_gpu`` copies it verbatim as the served ``model.py``, whose
``create_model()`` the PyTorch backend calls before loading ``model.safetensors``.
"""

from __future__ import annotations

import torch
from torch import nn

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride of the first block)
EXPANSION = 4
NUM_CLASSES = 1000
PARAMETERS = 25_557_032  # torchvision.models.resnet50().parameters(), summed


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand, plus the (projected) shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        stages = []
        for width, blocks, stride in STAGES:
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(channels, width, stride if b == 0 else 1))
                channels = width * EXPANSION
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convolutions (fan out), unit BatchNorm, and the last BatchNorm of each block
        scaled down so that activations stay in fp16 range through 16 residual additions."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = m.in_features**-0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.uniform_(m.bias, -bound, bound)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def create_model() -> nn.Module:
    """The module the PyTorch backend builds before it loads ``model.safetensors`` into it."""
    return ResNet50()


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights of a ResNet-50 initialised under ``torch.manual_seed(seed)``: same seed, same tensors."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = ResNet50()
    finally:
        torch.random.set_rng_state(state)
    return {k: v.detach().contiguous() for k, v in net.state_dict().items()}
