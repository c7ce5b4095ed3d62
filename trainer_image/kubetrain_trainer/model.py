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
from kubetrain_trainer.hf.model import KVCache, attention_mask, positions_from_documents


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
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.heads = cfg.heads
        self.layer = layer
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        k, v = split(self.k(x)), split(self.v(x))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # Without a mask: the fused kernel (flash / memory-efficient on GPU) with the
        # causal mask built in; with one (padding, a cache): the boolean mask.
        y = F.scaled_dot_product_attention(
            split(self.q(x)), k, v, attn_mask=mask, is_causal=mask is None
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
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg, layer)
        self.norm2 = nn.RMSNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.context_length, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
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

    def forward(
        self,
        idx: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T).

        The calling convention of ``kubetrain_trainer.hf.model.CausalLM``, so that one
        sampler drives both: ``document_ids`` (B, T) keep left padding
        (``PAD_DOCUMENT``) out of attention, positions restart at each document unless
        ``position_ids`` are given, and ``cache`` continues the sequences cached so far.
        Without any of them: plain causal attention from position 0 (training).
        """
        t = idx.shape[1]
        past = 0 if cache is None else cache.length
        if past + t > self.cfg.context_length:
            raise ValueError(
                f"sequence of {past + t} tokens exceeds "
                f"model.contextLength={self.cfg.context_length}"
            )
        mask = None
        if cache is None and document_ids is None:
            pos = position_ids if position_ids is not None else torch.arange(t, device=idx.device)
        else:
            pos, mask = _positions_and_mask(idx, position_ids, document_ids, cache)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x, mask, cache)
        # Tied head: the output projection is the token embedding matrix.
        return F.linear(self.norm(x), self.tok.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _positions_and_mask(
    idx: torch.Tensor,
    position_ids: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    cache: KVCache | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids (B, T) and the boolean attention mask (B, 1, T, S) of a call with
    document ids or a cache, as ``CausalLM`` derives them: a continuation extends each
    row's last document from the position after its last cached one."""
    b, t = idx.shape
    past = 0 if cache is None else cache.length
    if cache is not None and cache.document_ids is not None:
        assert cache.next_position is not None
        if document_ids is None:
            document_ids = cache.document_ids[:, -1:].expand(b, t)
        if position_ids is None:
            position_ids = cache.next_position[:, None] + torch.arange(t, device=idx.device)
    if document_ids is None:
        document_ids = torch.zeros_like(idx)
    if position_ids is None:
        position_ids = positions_from_documents(document_ids)
    k_docs = document_ids
    if cache is not None:
        if cache.document_ids is not None:
            k_docs = torch.cat((cache.document_ids, document_ids), dim=1)
        cache.document_ids = k_docs
        cache.next_position = position_ids[:, -1] + 1
    return position_ids, attention_mask(document_ids, k_docs, past, None)


def build_model(spec: ModelSpec) -> GPT:
    """A freshly initialised model for ``spec`` (seed the RNG first for reproducibility)."""
    return GPT(GPTConfig.from_spec(spec))
