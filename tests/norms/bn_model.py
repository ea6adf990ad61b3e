"""A small BatchNorm-in-transformer model (SLAB-style re-parameterized BN in place of LayerNorm).

Conv patch stem → BN2d; per block a pre-BN (BN over channels between two transposes) read by
the q/k/v projections, and a post-BN after the MLP's output projection; a pooled Linear → BN1d
head. Every BN has random statistics and affine parameters, so a wrong fold shows.
"""

from __future__ import annotations

import torch
from torch import nn


class TransposedBatchNorm(nn.Module):
    """BatchNorm1d over the hidden axis of [B, S, D] (the form SLAB uses)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.pre = TransposedBatchNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.post = TransposedBatchNorm(dim)

    def forward(self, x):
        b, s, d = x.shape
        h = self.pre(x)
        q, k, v = (p(h).reshape(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.post(self.fc2(torch.relu(self.fc1(x))))


class BatchNormViT(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, kernel_size=8, stride=8)
        self.stem_bn = nn.BatchNorm2d(dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, dim)
        self.head_bn = nn.BatchNorm1d(dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, pixel_values):
        x = self.stem_bn(self.stem(pixel_values)).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.out(torch.relu(self.head_bn(self.head(x.mean(dim=1)))))


def randomize_batchnorms(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                n = bn.num_features
                bn.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
                bn.bias.copy_(0.2 * torch.randn(n, generator=generator))
                bn.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
                bn.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def factory():
    """``txcompile compile tests/norms/bn_model.py:factory``."""
    torch.manual_seed(0)
    model = BatchNormViT().eval()
    randomize_batchnorms(model)
    return model, {"pixel_values": torch.randn(2, 3, 32, 32)}
