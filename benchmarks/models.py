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
