"""The built-in decoder-only transformer (nanoGPT-style).

Token embedding tied to the output head, learned positions, pre-norm blocks with
RMSNorm (weight only), bias-free attention and MLP. Exactly the parameters that
``kubetrain.core.accounting.parameter_count`` counts: V·d + C·d + L·(12d² + 2d) + d, so
estimates made before a run agree with what trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.core.api import ModelSpec
from kubetrain.core.architecture import builtin


@dataclass(frozen=True)
class GPTConfig:
    layers: int
    heads: int
    dim: int
    context_length: int
    vocab_size: int

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> GPTConfig:
        m = builtin(spec)
        return cls(
            layers=m.layers,
            heads=m.heads,
            dim=m.dim,
            context_length=m.context_length,
            vocab_size=m.vocab_size,
        )


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        # The fused kernel (flash / memory-efficient on GPU) with the causal mask built in.
        y = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.dim, 4 * cfg.dim, bias=False)
        self.proj = nn.Linear(4 * cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.context_length, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.apply(self._init)
        # GPT-2's scaled init: each residual branch adds variance, so the projections
        # writing into the residual stream shrink with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T), T ≤ context length."""
        t = idx.shape[1]
        if t > self.cfg.context_length:
            raise ValueError(
                f"sequence of {t} tokens exceeds model.contextLength={self.cfg.context_length}"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        # Tied head: the output projection is the token embedding matrix.
        return F.linear(self.norm(x), self.tok.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(spec: ModelSpec) -> GPT:
    """A freshly initialised model for ``spec`` (seed the RNG first for reproducibility)."""
    return GPT(GPTConfig.from_spec(spec))
