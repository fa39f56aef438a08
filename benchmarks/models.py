"""Model surgery shared by benchmarks and tests."""

from __future__ import annotations

import torch
from torch import nn


def expand_groups(module: nn.Module) -> int:
    """Replace every grouped (not depthwise) conv by the equivalent dense conv, as some
    converters do; returns how many were expanded."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and 1 < child.groups < child.in_channels:
            dense = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                              child.stride, child.padding, child.dilation, 1,
                              child.bias is not None)
            g, n = child.groups, child.out_channels
            w = torch.zeros_like(dense.weight)
            cg = child.in_channels // g
            for b in range(g):
                rows = slice(b * n // g, (b + 1) * n // g)
                w[rows, b * cg:(b + 1) * cg] = child.weight[rows]
            with torch.no_grad():
                dense.weight.copy_(w)
                if child.bias is not None:
                    dense.bias.copy_(child.bias)
            setattr(module, name, dense)
            count += 1
        else:
            count += expand_groups(child)
    return count


def reorder_channels(a: nn.Conv2d, bn: nn.BatchNorm2d, b: nn.Conv2d, perm: torch.Tensor) -> None:
    """Reorder the channels between conv `a` (and its BatchNorm) and conv `b`: same function."""
    with torch.no_grad():
        a.weight.copy_(a.weight[perm])
        if a.bias is not None:
            a.bias.copy_(a.bias[perm])
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t.copy_(t[perm])
        b.weight.copy_(b.weight[:, perm])


def shuffle_bottlenecks(module: nn.Module, seed: int = 0) -> int:
    """Reorder, at random, the channels on both sides of every bottleneck's middle conv of a
    torchvision ResNet/ResNeXt (conv1/bn1 -> conv2 -> bn2/conv3): the same function, but a
    grouped conv expanded to dense is then block-diagonal only after reordering. Returns how
    many blocks were shuffled."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    for block in module.modules():
        if all(hasattr(block, a) for a in ("conv1", "bn1", "conv2", "bn2", "conv3")):
            reorder_channels(block.conv1, block.bn1, block.conv2,
                     torch.randperm(block.conv2.in_channels, generator=g))
            reorder_channels(block.conv2, block.bn2, block.conv3,
                     torch.randperm(block.conv2.out_channels, generator=g))
            count += 1
    return count
