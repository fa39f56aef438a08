"""Modules graphslim swaps into a user's model when torch's own cannot hold the result.

`PointwiseMatMul` / `LinearAsConv`: the same layer computed by another op (conv-substitute's
to-matmul / to-conv), subclasses of nn.Conv2d / nn.Linear so every pass, `state_dict` and
training treat them as the layer they are; only `forward` (and so the ONNX export) differs.

`SlimMultiheadAttention`: nn.MultiheadAttention ties the attention's inner width to its input and
output width (embed_dim) and derives the softmax scale from it; after pruning head dimensions or
whole heads they differ. This module computes the same function (packed in-projection, scaled
dot-product attention, out-projection) with the inner width, head count and scale held apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PointwiseMatMul(nn.Conv2d):
    """A 1x1 conv (stride 1, no padding, one group) computed as W (O, C) @ x (N, C, H*W), or on
    a 1x1-pixel input as a linear map on (N, C): exports as MatMul / Gemm instead of Conv."""

    def forward(self, x):
        w = self.weight.flatten(1)
        if x.shape[2] == 1 and x.shape[3] == 1:
            return F.linear(x.flatten(1), w, self.bias)[:, :, None, None]
        y = torch.matmul(w, x.flatten(2))
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.unflatten(2, x.shape[2:])


class LinearAsConv(nn.Linear):
    """A linear layer on (N, C) computed as a 1x1 conv on (N, C, 1, 1): exports as Conv."""

    def forward(self, x):
        w = self.weight[:, :, None, None]
        return F.conv2d(x[:, :, None, None], w, self.bias).flatten(1)


class SlimMultiheadAttention(nn.Module):
    """Drop-in for a self- or cross-attention nn.MultiheadAttention (same call signature, same
    parameter names: in_proj_weight (3 x inner, embed_dim), in_proj_bias, out_proj)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, out_dim: int,
                 scale: float, batch_first: bool = False, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.scale, self.batch_first, self.dropout = scale, batch_first, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, out_dim, bias=bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> SlimMultiheadAttention:
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only packed q/k/v projections without bias_k/add_zero_attn")
        head_dim = mha.embed_dim // mha.num_heads
        new = cls(mha.embed_dim, mha.num_heads, head_dim, mha.out_proj.out_features,
                  1.0 / math.sqrt(head_dim), mha.batch_first, mha.dropout,
                  mha.in_proj_bias is not None)
        new.in_proj_weight = mha.in_proj_weight
        new.in_proj_bias = mha.in_proj_bias
        new.out_proj = mha.out_proj
        new.train(mha.training)
        return new

    def sync(self) -> None:
        """Sizes from the (sliced) parameters: heads may have gone, or head dimensions."""
        inner = self.in_proj_weight.shape[0] // 3
        self.embed_dim = self.in_proj_weight.shape[1]
        self.head_dim = inner // self.num_heads
        self.out_proj.in_features, self.out_proj.out_features = self.out_proj.weight.shape[1], \
            self.out_proj.weight.shape[0]

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, t, s = query.shape[0], query.shape[1], key.shape[1]
        w = self.in_proj_weight.chunk(3)
        bias = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        h, d = self.num_heads, self.head_dim
        q = F.linear(query, w[0], bias[0]).view(b, t, h, d).transpose(1, 2)
        k = F.linear(key, w[1], bias[1]).view(b, s, h, d).transpose(1, 2)
        v = F.linear(value, w[2], bias[2]).view(b, s, h, d).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype, b, h, t, s)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * self.scale
            if mask is not None:
                scores = scores + mask
            if is_causal:
                scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool,
                                                       device=q.device).triu(1), float("-inf"))
            attn = F.dropout(scores.softmax(-1), p, self.training)
            out = attn @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=is_causal, scale=self.scale)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, h * d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _merge_masks(attn_mask, key_padding_mask, dtype, b, h, t, s):
    """Additive float mask (b, h, t, s) or None, from nn.MultiheadAttention's two masks."""
    mask = None
    for m, shape in ((attn_mask, None), (key_padding_mask, (b, 1, 1, s))):
        if m is None:
            continue
        if m.dtype == torch.bool:
            m = torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        if shape is not None:
            m = m.view(shape)
        elif m.dim() == 3:
            m = m.view(b, h, t, s)
        mask = m if mask is None else mask + m
    return mask
