"""Small blocks for the encrypted-run tests, as ``file.py:factory`` specs the exporter takes.

Hidden sizes are tiny on purpose: the CKKS runtime encrypts every element separately.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HIDDEN, INNER, TOKENS, HEAD = 4, 8, 2, 4


class MlpBlock(nn.Module):
    """linear → GELU → linear, as in a BERT feed-forward block."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(HIDDEN, INNER)
        self.down = nn.Linear(INNER, HIDDEN)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(hidden_states)))


class AttentionHead(nn.Module):
    """One attention head: softmax(q kᵀ/√d) v."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(HIDDEN, HEAD)
        self.k = nn.Linear(HIDDEN, HEAD)
        self.v = nn.Linear(HIDDEN, HEAD)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(hidden_states), self.k(hidden_states), self.v(hidden_states)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HEAD)
        return torch.matmul(torch.softmax(scores, dim=-1), v)


def _example() -> torch.Tensor:
    return torch.randn(1, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))


def mlp_block():
    torch.manual_seed(0)
    return MlpBlock().eval(), {"hidden_states": _example()}


def attention_head():
    torch.manual_seed(0)
    return AttentionHead().eval(), {"hidden_states": _example()}
