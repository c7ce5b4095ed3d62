"""A Hugging Face ``config.json`` read into kubetrain's typed model description.

Pure Python on purpose (no torch, no transformers): the parameter count and FLOPs of a
model are needed before any GPU is asked for (``kubetrain estimate``, the operator's
up-front estimate), so this lives in ``kubetrain.core`` and the trainer builds its
native models (``kubetrain_trainer.hf.model``) from the same :class:`ModelConfig`.

Every family's defaults for keys a ``config.json`` may leave out are the ones
transformers' config classes use, so a folder means the same model here and there.
Keys that change the architecture in ways the native model does not implement are
refused with the key, the value and what is supported, never ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# model_type -> the class name transformers (and vLLM) load the folder with.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
DEFAULT_ROPE_THETA = 10_000.0
CONFIG_FILE = "config.json"

# Defaults of transformers' config classes for keys that config.json files omit.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "tie_word_embeddings": False},
    "mistral": {"max_position_embeddings": 4096 * 32, "tie_word_embeddings": False},
    "qwen2": {"max_position_embeddings": 32768, "tie_word_embeddings": False},
    "qwen3": {"max_position_embeddings": 32768, "tie_word_embeddings": False, "head_dim": 128},
}


class ModelFormatError(ValueError):
    """A model folder kubetrain cannot use; the message names the file, key and value."""


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding settings (``rope_parameters`` / ``rope_scaling``)."""

    type: Literal["default", "linear", "dynamic", "llama3", "yarn"] = "default"
    theta: float = DEFAULT_ROPE_THETA
    factor: float = 1.0
    original_max_positions: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder-only model, whatever its family.

    ``family`` picks the block structure: ``llama`` (RMSNorm, RoPE, grouped-query
    attention, SwiGLU; Llama, Mistral, Qwen2, Qwen3) or ``gpt2`` (LayerNorm, learned
    positions, fused QKV, GELU MLP).
    """

    model_type: str
    family: Literal["llama", "gpt2"]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    activation: str
    tie_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope: Rope | None = None
    # Per layer: attend to at most this many most recent positions (None: all).
    sliding_windows: tuple[int | None, ...] = ()
    # Per layer: the softmax scale (GPT-2 may scale by the inverse layer index).
    attention_scales: tuple[float, ...] = ()
    # The config.json this came from, passed through when the model is saved.
    source: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def dtype_name(self) -> str | None:
        """The checkpoint's stored dtype (``bfloat16``, ``float32``...), if it says."""
        value = self.source.get("dtype", self.source.get("torch_dtype"))
        return value if isinstance(value, str) else None


def read_config(folder: str | Path) -> ModelConfig:
    """The ``config.json`` of a Hugging Face model folder."""
    path = Path(folder) / CONFIG_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelFormatError(
            f"{folder}: no config.json (a Hugging Face model folder has config.json, "
            "*.safetensors and tokenizer files)"
        ) from None
    return parse_config(text, where=str(path))


def parse_config(text: str, *, where: str) -> ModelConfig:
    """A ``config.json``'s text (``where`` names it in errors)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{where}: expected a JSON object")
    return from_hf_config(raw, where=where)


def from_hf_config(raw: dict[str, Any], *, where: str = "config.json") -> ModelConfig:
    """Map a ``config.json`` dictionary to a :class:`ModelConfig` (or say what is wrong)."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFormatError(
            f"{where}: model_type={model_type!r} is not supported "
            f"(accepted: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if raw.get("quantization_config"):
        raise ModelFormatError(
            f"{where}: quantization_config is set; quantized checkpoints are not supported "
            "(accepted: unquantized float16, bfloat16 or float32 weights)"
        )
    if model_type == "gpt2":
        return _gpt2(raw, where)
    return _llama_family(raw, model_type, where)


def _get(raw: dict[str, Any], key: str, where: str, kind: type, default: Any = ...) -> Any:
    value = raw.get(key)
    if value is None:
        if default is ...:
            raise ModelFormatError(f"{where}: missing {key} (required for {raw['model_type']})")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ModelFormatError(
            f"{where}: {key}={value!r} is not a {kind.__name__} (accepted: a {kind.__name__})"
        )
    if isinstance(value, int | float) and value <= 0:
        raise ModelFormatError(f"{where}: {key}={value!r} (accepted: a positive number)")
    return value


def _activation(raw: dict[str, Any], key: str, where: str, default: str) -> str:
    act = raw.get(key) or default
    if act not in ACTIVATIONS:
        raise ModelFormatError(
            f"{where}: {key}={act!r} is not supported (accepted: {', '.join(ACTIVATIONS)})"
        )
    return act


def _llama_family(raw: dict[str, Any], model_type: str, where: str) -> ModelConfig:
    defaults = _FAMILY_DEFAULTS[model_type]
    hidden = _get(raw, "hidden_size", where, int)
    heads = _get(raw, "num_attention_heads", where, int)
    layers = _get(raw, "num_hidden_layers", where, int)
    kv_heads = _get(raw, "num_key_value_heads", where, int, heads)
    if heads % kv_heads:
        raise ModelFormatError(
            f"{where}: num_key_value_heads={kv_heads} does not divide "
            f"num_attention_heads={heads} (accepted: a divisor)"
        )
    head_dim = _get(raw, "head_dim", where, int, defaults.get("head_dim", hidden // heads))
    # Qwen2 always has q/k/v biases; Llama and Qwen3 have them with attention_bias.
    attention_bias = bool(raw.get("attention_bias", False))
    qkv_bias = model_type == "qwen2" or (model_type in ("llama", "qwen3") and attention_bias)
    return ModelConfig(
        model_type=model_type,
        family="llama",
        vocab_size=_get(raw, "vocab_size", where, int),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_get(raw, "intermediate_size", where, int),
        max_positions=_get(
            raw, "max_position_embeddings", where, int, defaults["max_position_embeddings"]
        ),
        norm_eps=_get(raw, "rms_norm_eps", where, float, 1e-6),
        activation=_activation(raw, "hidden_act", where, "silu"),
        tie_embeddings=bool(raw.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
        qkv_bias=qkv_bias,
        o_bias=model_type in ("llama", "qwen3") and attention_bias,
        mlp_bias=model_type == "llama" and bool(raw.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        rope=_rope(raw, head_dim, where),
        sliding_windows=_sliding_windows(raw, model_type, layers, where),
        attention_scales=(head_dim**-0.5,) * layers,
        source=dict(raw),
    )


def _rope(raw: dict[str, Any], head_dim: int, where: str) -> Rope:
    # transformers 5 writes rope_parameters (theta inside); older files have rope_theta
    # next to rope_scaling, whose type key was once "type".
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        raise ModelFormatError(f"{where}: {key}={params!r} (accepted: a JSON object)")
    if any(name in params for name in ("full_attention", "sliding_attention")):
        raise ModelFormatError(
            f"{where}: {key} per layer type is not supported (accepted: one set for all layers)"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelFormatError(
            f"{where}: {key}.rope_type={rope_type!r} is not supported "
            f"(accepted: {', '.join(ROPE_TYPES)})"
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ModelFormatError(
            f"{where}: partial_rotary_factor={partial!r} is not supported (accepted: 1.0)"
        )
    theta = float(params.get("rope_theta", raw.get("rope_theta", DEFAULT_ROPE_THETA)))
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings")
    if rope_type in ("linear", "dynamic", "llama3") and factor is None:
        raise ModelFormatError(f"{where}: {key}.factor is required for rope_type {rope_type!r}")
    if rope_type in ("llama3", "yarn") and original is None:
        raise ModelFormatError(
            f"{where}: {key}.original_max_position_embeddings is required for rope_type "
            f"{rope_type!r}"
        )
    if rope_type == "yarn" and factor is None:
        # As transformers: the ratio of the extended to the original context.
        factor = raw.get("max_position_embeddings", 0) / original
    return Rope(
        type=rope_type,
        theta=theta,
        factor=float(factor if factor is not None else 1.0),
        original_max_positions=original,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def _sliding_windows(
    raw: dict[str, Any], model_type: str, layers: int, where: str
) -> tuple[int | None, ...]:
    if model_type == "llama":
        return (None,) * layers
    if model_type == "mistral":
        # Mistral's config class defaults the window to 4096 when the key is absent.
        window = raw.get("sliding_window", 4096)
        return (_window(window, where),) * layers
    # Qwen2/Qwen3: a window only with use_sliding_window, and only on "sliding_attention"
    # layers (by default those from max_window_layers on).
    window = (
        _window(raw.get("sliding_window", 4096), where) if raw.get("use_sliding_window") else None
    )
    types = raw.get("layer_types")
    if types is None:
        first = int(raw.get("max_window_layers", 28))
        types = [
            "sliding_attention" if window is not None and i >= first else "full_attention"
            for i in range(layers)
        ]
    if not isinstance(types, list) or len(types) != layers:
        raise ModelFormatError(
            f"{where}: layer_types must list one entry per layer ({layers}), got {types!r}"
        )
    accepted = ("full_attention", "sliding_attention")
    for t in types:
        if t not in accepted:
            raise ModelFormatError(
                f"{where}: layer_types entry {t!r} is not supported "
                f"(accepted: {', '.join(accepted)})"
            )
    return tuple(window if t == "sliding_attention" else None for t in types)


def _window(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelFormatError(
            f"{where}: sliding_window={value!r} (accepted: a positive integer or null)"
        )
    return value


def _gpt2(raw: dict[str, Any], where: str) -> ModelConfig:
    if raw.get("add_cross_attention"):
        raise ModelFormatError(
            f"{where}: add_cross_attention=true is not supported (accepted: false; decoder-only)"
        )
    hidden = _get(raw, "n_embd", where, int)
    heads = _get(raw, "n_head", where, int)
    layers = _get(raw, "n_layer", where, int)
    if hidden % heads:
        raise ModelFormatError(
            f"{where}: n_head={heads} does not divide n_embd={hidden} (accepted: a divisor)"
        )
    head_dim = hidden // heads
    scale = head_dim**-0.5 if raw.get("scale_attn_weights", True) else 1.0
    by_layer = bool(raw.get("scale_attn_by_inverse_layer_idx", False))
    return ModelConfig(
        model_type="gpt2",
        family="gpt2",
        vocab_size=_get(raw, "vocab_size", where, int),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=_get(raw, "n_inner", where, int, 4 * hidden),
        max_positions=_get(raw, "n_positions", where, int),
        norm_eps=_get(raw, "layer_norm_epsilon", where, float, 1e-5),
        activation=_activation(raw, "activation_function", where, "gelu_new"),
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        sliding_windows=(None,) * layers,
        attention_scales=tuple(scale / (i + 1) if by_layer else scale for i in range(layers)),
        source=dict(raw),
    )


# --------------------------------------------------------------------------- accounting


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the model (tied embeddings once): equals the built model's numel."""
    d, v, inter = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    head = 0 if cfg.tie_embeddings else v * d
    if cfg.family == "gpt2":
        block = (
            2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inter + inter) + (inter * d + d)
        )
        return v * d + cfg.max_positions * d + cfg.num_layers * block + 2 * d + head
    attention = d * q_width + 2 * d * kv_width + q_width * d
    attention += (
        (q_width + 2 * kv_width) * cfg.qkv_bias + d * cfg.o_bias + 2 * cfg.head_dim * cfg.qk_norm
    )
    mlp = 3 * d * inter + (2 * inter + d) * cfg.mlp_bias
    return v * d + cfg.num_layers * (attention + mlp + 2 * d) + d + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token, by kubetrain.core.accounting's rule:
    6 per weight that takes part in a matrix product (the output head, not the lookups)
    plus 12·layers·attention width·attended length for the attention scores."""
    lookups = cfg.vocab_size * cfg.hidden_size * (not cfg.tie_embeddings)
    if cfg.family == "gpt2":
        lookups += cfg.max_positions * cfg.hidden_size
    n_matmul = parameter_count(cfg) - lookups
    width = cfg.num_heads * cfg.head_dim
    attended = sum(min(seq_len, w) if w else seq_len for w in cfg.sliding_windows)
    return 6.0 * n_matmul + 12.0 * width * attended
