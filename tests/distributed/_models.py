"""Tiny models and data shared by the distributed worker scripts (imported, not collected)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

D_IN, D_MODEL, D_FF, D_OUT, SEQ = 5, 12, 33, 2, 4

#: The FSDP2 worker's runs (``+fused``: the fast path of the shards' device) and, of those, the
#: ones its non-finite check covers; tests/distributed/test_fsdp.py reads the results by these names.
FSDP_ESTIMATORS = (
    "diagonal",
    "rank_one",
    "none",
    "folded",
    "diagonal+fused",
    "rank_one+fused",
    "none+fused",
    "folded+fused",
)
FSDP_NONFINITE = (
    "diagonal",
    "none",
    "folded",
    "rank_one",
    "diagonal+fused",
    "none+fused",
    "folded+fused",
    "rank_one+fused",
)


class Block(nn.Module):
    """A pre-norm transformer block: attention and an MLP, each with a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        # No qkv bias: the key bias has a zero gradient in exact arithmetic (softmax is shift
        # invariant), so its float gradient is rounding noise that Adam scaling turns into ±lr.
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL, bias=False)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.fc1 = nn.Linear(D_MODEL, D_FF)
        self.fc2 = nn.Linear(D_FF, D_MODEL)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Net(nn.Module):
    """Input projection, a learned start token of shape (1, d), a block and a 2-row head.

    The (1, d) token and the (2, d) head leave some ranks with an empty local shard under
    ``Shard(0)`` on 2 and 3 ranks; 33 and 36 rows make the other shards uneven.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, D_MODEL)
        self.start = nn.Parameter(torch.randn(1, D_MODEL) * 0.1)
        self.block = Block()
        self.head = nn.Linear(D_MODEL, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = torch.cat([self.start.expand(h.shape[0], 1, D_MODEL), h], dim=1)
        return self.head(self.block(h))


def make_model(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int, size: int) -> tuple[Tensor, Tensor]:
    """The full batch of ``step`` (the same on every rank; each rank takes its slice)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, SEQ, D_IN, generator=g)
    y = torch.randn(size, SEQ + 1, D_OUT, generator=g)
    return x, y


def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(model(x), y)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups (decay for matrices, none for vectors) so that a step has two reductions."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
