"""Training-time pressure toward structures the rewrite passes can exploit (torch side).

`block_penalty`: a group-lasso penalty (Yuan & Lin 2006; structured sparsity as in Wen et al.
2016) that pushes every dense Conv2d toward g diagonal blocks: the sum, over the layer's
off-diagonal tiles (output block a, input block b, a != b), of the tile's Frobenius norm. The
norm is not differentiable at zero, so whole tiles reach (near) zero, not just small weights;
after fine-tuning with it, `conv-group{groups=g}` finds the blocks and drops almost nothing.
Blocks are contiguous channel ranges: training moves the weights to them, so no reordering is
needed (conv-group's search starts from this order and keeps it when it is best).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch import nn


def _off_block_tiles(conv: nn.Conv2d, groups: int) -> torch.Tensor:
    n, c = conv.weight.shape[:2]
    w = conv.weight.reshape(groups, n // groups, groups, c // groups, -1)
    norms = w.pow(2).sum(dim=(1, 3, 4)).add(1e-12).sqrt()  # (out block, in block)
    return norms * (1 - torch.eye(groups, device=norms.device, dtype=norms.dtype))


def block_penalty(module: nn.Module, groups: int, exclude: Sequence[str] = (),
                  min_channels: int = 4) -> Callable[[], torch.Tensor]:
    """A function returning the penalty of `module`'s eligible convs now (add lam x it to the
    loss): dense 2-D convs whose channel counts `groups` divides with at least `min_channels`
    inputs per group, names not matching `exclude` (fnmatch patterns)."""
    convs = [m for name, m in module.named_modules()
             if isinstance(m, nn.Conv2d) and m.groups == 1
             and not any(fnmatch.fnmatch(name, p) for p in exclude)
             and m.out_channels % groups == 0 and m.in_channels % groups == 0
             and m.in_channels // groups >= min_channels]
    if not convs:
        raise ValueError(f"no dense conv of the module splits into {groups} groups")

    def penalty() -> torch.Tensor:
        return sum(_off_block_tiles(m, groups).sum() for m in convs)

    return penalty
