"""Native PyTorch definitions of the Hugging Face model families kubetrain fine-tunes.

Decision: kubetrain implements the architectures itself (Llama 2/3, Mistral, Qwen2/2.5,
Qwen3 as one decoder; GPT-2 as another) instead of running transformers' model classes,
and proves them equal to transformers' forward in the tests (logits within 1e-4 in
float32 for a random model of each family). Why:

- FSDP2 and torch.compile: each block is a plain ``nn.Module`` whose forward is tensor
  code with no data-dependent Python branches, no ``.item()``, no cache objects or
  output dataclasses; ``fully_shard`` wraps ``model.blocks`` one by one and
  ``torch.compile(fullgraph=True)`` traces a forward without graph breaks (tested).
  transformers' classes carry generation, output recording and backend dispatch
  machinery that changes between releases (version 5 renamed ``rope_scaling``,
  reworked caches and masks), which is exactly what a long training job should not
  depend on.
- Packing: attention takes per-token document ids and position ids directly, so packed
  rows never attend across examples, on any backend, with one code path.
- Speed: attention goes through ``scaled_dot_product_attention`` (flash kernel for the
  plain causal case, the memory-efficient kernel with a boolean mask for packed rows or
  sliding windows); nothing else sits between the matmuls.
- Dependencies: the trainer image needs torch, safetensors and tokenizers, not
  transformers and its dependency tree.
- Breadth is the cost: a family transformers supports is not supported here until it is
  added; ``config.from_hf_config`` refuses it by name. Five families cover most
  fine-tuning (Llama, Mistral, Qwen, and the models built on their architectures).

Behaviour worth knowing:
- Parameter names equal transformers' (``model.layers.0.self_attn.q_proj.weight``), so
  loading and saving Llama-family weights is a name-for-name copy; GPT-2's ``Conv1D``
  weights are stored transposed and are transposed on the way in and out.
- Mistral/Qwen sliding windows are exact at any length (the boolean mask excludes keys
  further back than the window); the KV cache keeps all keys, so generation past the
  window uses memory for the whole sequence rather than a rolling buffer.
- Dropout is not applied (fine-tuning recipes set it to 0; GPT-2's configs default to
  0.1, which transformers applies in training mode and kubetrain does not).
- ``dynamic`` RoPE stretches the frequencies for the longest position of the call, like
  transformers' first forward; transformers also keeps a stretched state across calls,
  which kubetrain does not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.core.hf_config import ModelConfig
from kubetrain_trainer.hf import rope as rope_fns

PAD_DOCUMENT = -1  # the document id of padding: it attends only to other padding

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class KVCache:
    """Keys and values of the positions seen so far, for generation.

    Stores keys and values per layer before grouped-query heads are repeated, the
    document id of every cached position (so left-padded prompts keep their padding
    out of attention) and the next position id of each row.
    """

    def __init__(self, layers: int):
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.document_ids: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.document_ids is None else self.document_ids.shape[1]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) that restart at 0 where the document id changes."""
    t = document_ids.shape[1]
    index = torch.arange(t, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def attention_mask(
    q_docs: torch.Tensor, k_docs: torch.Tensor, past: int, window: int | None
) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask, True where a query may attend to a key: causal, within
    the query's document, and within ``window`` positions when there is one."""
    t, s = q_docs.shape[1], k_docs.shape[1]
    q_index = torch.arange(past, past + t, device=q_docs.device)[:, None]
    k_index = torch.arange(s, device=q_docs.device)[None, :]
    allowed = k_index <= q_index
    if window is not None:
        allowed = allowed & (k_index > q_index - window)
    return (allowed[None] & (q_docs[:, :, None] == k_docs[:, None, :]))[:, None]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Scaled dot-product attention of (B, H, T, D) queries over (B, KV, S, D) keys.

    ``mask`` None means plain causal attention over as many keys as queries (the flash
    kernel's case). Grouped key/value heads are repeated to the query heads: every SDPA
    backend takes that, which is not true of ``enable_gqa``.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale
    )


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# --------------------------------------------------------------------------- llama family


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.layer, self.head_dim = layer, hd
        self.scale = cfg.attention_scales[layer]
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.o_bias)
        # Qwen3 normalises each head's queries and keys before the rotation.
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope_fns.apply_rotary(q.transpose(1, 2), cos, sin)
        k = rope_fns.apply_rotary(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = attend(q, k, v, mask, self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class GatedMLP(nn.Module):
    """SwiGLU (or another gate activation): down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, inter, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, inter, bias=bias)
        self.up_proj = nn.Linear(d, inter, bias=bias)
        self.down_proj = nn.Linear(inter, d, bias=bias)
        self.act: Callable[[torch.Tensor], torch.Tensor] = _ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm block of the Llama family: the unit FSDP shards and checkpoints."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        assert rope is not None
        x = x + self.self_attn(self.input_layernorm(x), rope[0], rope[1], mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.rope is not None
        self.rope, self.head_dim, self.max_positions = cfg.rope, cfg.head_dim, cfg.max_positions
        inv_freq, self.scale = rope_fns.inverse_frequencies(cfg.rope, cfg.head_dim)
        # Computed from the config, never loaded or saved.
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    inv_freq: torch.Tensor

    def reset_buffers(self) -> None:
        inv_freq, _ = rope_fns.inverse_frequencies(self.rope, self.head_dim)
        self.inv_freq.copy_(inv_freq)

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.rope.type == "dynamic":
            inv_freq = rope_fns.dynamic_frequencies(
                self.rope, self.head_dim, self.max_positions, inv_freq, position_ids
            )
        return rope_fns.cos_sin(inv_freq, position_ids, self.scale, dtype)


class LlamaTrunk(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


# --------------------------------------------------------------------------- gpt-2


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.hidden_size
        self.layer, self.head_dim = layer, cfg.head_dim
        self.scale = cfg.attention_scales[layer]
        # transformers' Conv1D holds these weights transposed; they are transposed when
        # loaded and saved (weights.py), so here they are ordinary Linear layers.
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            y.view(b, t, -1, self.head_dim).transpose(1, 2) for y in self.c_attn(x).split(d, dim=2)
        )
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = attend(q, k, v, mask, self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act: Callable[[torch.Tensor], torch.Tensor] = _ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Trunk(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


# --------------------------------------------------------------------------- the model


class CausalLM(nn.Module):
    """A decoder-only language model of any supported family.

    ``forward(input_ids, position_ids=None, document_ids=None, cache=None)`` returns
    logits (B, T, V). ``document_ids`` (B, T) keeps packed examples apart: a token
    attends only to earlier tokens with the same id, and positions restart at each new
    id unless ``position_ids`` are given. ``cache`` (a :class:`KVCache`) makes the call
    continue the sequences cached so far.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.windows = sorted(set(cfg.sliding_windows), key=lambda w: (w is not None, w or 0))
        if cfg.family == "gpt2":
            self.transformer = GPT2Trunk(cfg)
            embed: nn.Embedding = self.transformer.wte
        else:
            self.model = LlamaTrunk(cfg)
            embed = self.model.embed_tokens
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = embed.weight

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order: the units for FSDP and activation checkpoints."""
        return self.transformer.h if self.config.family == "gpt2" else self.model.layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.transformer.wte if self.config.family == "gpt2" else self.model.embed_tokens

    def tie_weights(self) -> None:
        """Make the output head the token embedding again (after weights were assigned)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the buffers that are derived from the config, not loaded (the rotary
        frequencies): needed after ``to_empty()`` materialises a meta-device model, as
        FSDP initialisation on the meta device does."""
        if self.config.family != "gpt2":
            self.model.rotary_emb.reset_buffers()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random initialisation as transformers does it (normal weights, zero biases,
        unit norms): for training a family's architecture from scratch."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm | nn.LayerNorm):
                nn.init.ones_(module.weight)
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor):
                    nn.init.zeros_(bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, position_ids, document_ids, cache))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head over final hidden states (callers may chunk large vocabularies)."""
        return self.lm_head(hidden)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, hidden_size)."""
        past = 0 if cache is None else cache.length
        if self.config.family == "gpt2" and past + input_ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"sequence of {past + input_ids.shape[1]} tokens exceeds the model's "
                f"n_positions={self.config.max_positions}"
            )
        document_ids, position_ids = self._ids(input_ids, position_ids, document_ids, cache)
        masks = self._masks(input_ids, document_ids, cache, past)
        if cache is not None:
            cache.next_position = position_ids[:, -1] + 1
        if self.config.family == "gpt2":
            x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)
            rope = None
        else:
            x = self.model.embed_tokens(input_ids)
            rope = self.model.rotary_emb(position_ids, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, masks[self.config.sliding_windows[i]], cache)
        norm = self.transformer.ln_f if self.config.family == "gpt2" else self.model.norm
        return norm(x)

    def _ids(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        document_ids: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        b, t = input_ids.shape
        if cache is not None and cache.document_ids is not None:
            assert cache.next_position is not None
            # A continuation: new tokens extend each row's last document.
            if document_ids is None:
                document_ids = cache.document_ids[:, -1:].expand(b, t)
            if position_ids is None:
                position_ids = cache.next_position[:, None] + torch.arange(
                    t, device=input_ids.device
                )
        elif cache is not None and document_ids is None:
            document_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            if document_ids is not None:
                position_ids = positions_from_documents(document_ids)
            else:
                position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        return document_ids, position_ids

    def _masks(
        self,
        input_ids: torch.Tensor,
        document_ids: torch.Tensor | None,
        cache: KVCache | None,
        past: int,
    ) -> dict[int | None, torch.Tensor | None]:
        """One mask per distinct sliding window; ``{None: None}`` for plain causal
        attention, which needs no mask tensor and takes the flash kernel."""
        if document_ids is None and self.windows == [None]:
            return {None: None}
        # With a cache, document ids always exist (_ids made them).
        docs = document_ids if document_ids is not None else torch.zeros_like(input_ids[:1])
        k_docs = docs
        if cache is not None:
            if cache.document_ids is not None:
                k_docs = torch.cat((cache.document_ids, docs), dim=1)
            cache.document_ids = k_docs
        return {w: attention_mask(docs, k_docs, past, w) for w in self.windows}


def build_model(cfg: ModelConfig) -> CausalLM:
    """An uninitialised model for ``cfg``; build it under ``torch.device("meta")`` to
    load weights without allocating twice (weights.load_pretrained does)."""
    return CausalLM(cfg)
