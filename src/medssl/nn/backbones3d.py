"""3D ResNets for volumes (MRI / CT), in the torchvision / MONAI ResNet key layout.

timm has no 3D models, so medssl builds its own ResNet with ``Conv3d`` / ``BatchNorm3d`` and the same
module names as the 2D ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``downsample.0``), so weights
read the same way in 2D and 3D and map onto ``monai.networks.nets.ResNet`` (``spatial_dims=3``) by name.
Architecture: He et al. 2016 basic-block ResNets, Hara et al. 2018 for the 3D form.
"""

from __future__ import annotations

import torch
from torch import nn

from medssl.errors import ConfigError

#: name -> blocks per stage (basic blocks)
RESNET3D_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "resnet10_3d": (1, 1, 1, 1),
    "resnet18_3d": (2, 2, 2, 2),
    "resnet34_3d": (3, 4, 6, 3),
}


class BasicBlock3d(nn.Module):
    """Two 3x3x3 convolutions with a residual connection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(out_ch)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_ch)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm3d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class ResNet3d(nn.Module):
    """A 3D ResNet returning globally pooled features ``(B, num_features)``.

    Args:
        layers: basic blocks per stage.
        in_chans: input channels.
        stem: ``default`` (7x7x7 stride-2 conv + max-pool) or ``cifar`` (3x3x3 stride-1, no pool) for small
            volumes such as 28-32³ MedMNIST-3D.
        widths: channels per stage.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        in_chans: int = 1,
        stem: str = "default",
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        if stem == "default":
            self.conv1 = nn.Conv3d(in_chans, widths[0], 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool3d(3, 2, 1)
        elif stem == "cifar":
            self.conv1 = nn.Conv3d(in_chans, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ConfigError(f"model.stem must be 'default' or 'cifar', got '{stem}'")
        self.bn1 = nn.BatchNorm3d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        stages = []
        in_ch = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            blocks = [BasicBlock3d(in_ch, w, 1 if i == 0 else 2)]
            blocks += [BasicBlock3d(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(B, C, d, h, w)``."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3, 4))


def build_backbone_3d(name: str, *, in_chans: int, stem: str = "default") -> ResNet3d:
    """Build a 3D backbone by name (``resnet10_3d``, ``resnet18_3d``, ``resnet34_3d``).

    A 2D name with a 3D counterpart (``resnet18`` → ``resnet18_3d``) selects the counterpart, so the default
    backbone works on volumes too.

    Raises:
        ConfigError: for an unknown name, listing the valid ones.
    """
    if name not in RESNET3D_LAYERS and f"{name}_3d" in RESNET3D_LAYERS:
        name = f"{name}_3d"
    if name not in RESNET3D_LAYERS:
        raise ConfigError(
            f"backbone '{name}' has no 3D version; 3D data needs one of {', '.join(RESNET3D_LAYERS)}"
        )
    return ResNet3d(RESNET3D_LAYERS[name], in_chans=in_chans, stem=stem)
