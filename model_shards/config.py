"""MiniMax-M1 / Text-01 model configuration, read from either published config.json flavour.

The original flavour (model_type minimax_m1 / minimax_text_01) uses attn_type_list, layernorm_*_alpha/beta and
rotary_dim; the transformers flavour (model_type minimax) uses layer_types, *_alpha_factor and rope_parameters.
Both become one validated ModelConfig; anything we cannot compute faithfully fails here, naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

LINEAR = "linear_attention"  # lightning attention, fixed-size state
FULL = "full_attention"  # softmax GQA with a KV cache

ORIGINAL_MODEL_TYPES = ("minimax_m1", "minimax_text_01")
TRANSFORMERS_MODEL_TYPES = ("minimax",)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    intermediate_size: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    layer_types: tuple[str, ...]
    linear_attn_alpha: float
    linear_attn_beta: float
    full_attn_alpha: float
    full_attn_beta: float
    mlp_alpha: float
    mlp_beta: float
    max_position_embeddings: int
    block_size: int = 256  # lightning prefill block (HF-orig constant BLOCK)
    postnorm: bool = True
    tie_word_embeddings: bool = False
    lightning_norm_eps: float = 1e-6  # the inner RMSNorm of lightning layers (HF-orig default, not rms_norm_eps)

    # ---- derived shapes -------------------------------------------------------------------------------
    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR]

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def attn_alpha_beta(self, layer: int) -> tuple[float, float]:
        if self.layer_types[layer] == LINEAR:
            return self.linear_attn_alpha, self.linear_attn_beta
        return self.full_attn_alpha, self.full_attn_beta

    # ---- reading ----------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError("config must be a JSON object")
        model_type = d.get("model_type")
        if model_type in ORIGINAL_MODEL_TYPES:
            fields = _original_fields(d)
        elif model_type in TRANSFORMERS_MODEL_TYPES:
            fields = _transformers_fields(d)
        else:
            raise ConfigError(
                f"model_type: {model_type!r} is not supported "
                f"(expected one of {ORIGINAL_MODEL_TYPES + TRANSFORMERS_MODEL_TYPES})")
        cfg = cls(**fields)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "rotary_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok",
                     "max_position_embeddings", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer types: {len(self.layer_types)} entries for num_hidden_layers="
                              f"{self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in (LINEAR, FULL):
                raise ConfigError(f"layer types[{i}]: unknown layer type {t!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                              f"num_attention_heads={self.num_attention_heads}")
        if not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
            raise ConfigError(f"rotary_dim: must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok: {self.num_experts_per_tok} > num_local_experts="
                              f"{self.num_local_experts}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta: must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps: must be positive, got {self.rms_norm_eps}")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings: true is not supported (MiniMax has a separate lm_head)")
        if not self.postnorm:
            raise ConfigError("postnorm: false is not supported (all published MiniMax-M1/Text-01 use postnorm)")

    def to_dict(self) -> dict:
        """The original (MiniMax-published) config.json flavour."""
        d = asdict(self)
        out = {
            "architectures": ["MiniMaxM1ForCausalLM"],
            "model_type": "minimax_m1",
            "attn_type_list": [0 if t == LINEAR else 1 for t in self.layer_types],
            "layernorm_linear_attention_alpha": self.linear_attn_alpha,
            "layernorm_linear_attention_beta": self.linear_attn_beta,
            "layernorm_full_attention_alpha": self.full_attn_alpha,
            "layernorm_full_attention_beta": self.full_attn_beta,
            "layernorm_mlp_alpha": self.mlp_alpha,
            "layernorm_mlp_beta": self.mlp_beta,
            "hidden_act": "silu",
            "shared_intermediate_size": 0,
            "shared_moe_mode": "sigmoid",
            "sliding_window": None,
        }
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "rotary_dim", "rope_theta", "intermediate_size", "num_local_experts",
                  "num_experts_per_tok", "rms_norm_eps", "max_position_embeddings", "postnorm",
                  "tie_word_embeddings"):
            out[k] = d[k]
        return out


def _require(d: dict, key: str):
    if key not in d or d[key] is None:
        raise ConfigError(f"{key}: missing")
    return d[key]


def _number(d: dict, key: str, default=None) -> float:
    """A float field (required when no default), checked so that a wrong type names the field."""
    value = _require(d, key) if default is None else d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    return float(value)


def _no_shared_experts(d: dict) -> None:
    shared = d.get("shared_intermediate_size", 0) or 0
    if isinstance(shared, list):
        shared = max(shared, default=0)
    if isinstance(shared, bool) or not isinstance(shared, (int, float)):
        raise ConfigError(f"shared_intermediate_size: must be a number, got {shared!r}")
    if shared > 0:
        raise ConfigError(f"shared_intermediate_size: {shared} > 0 (shared experts) is not supported")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act: {act!r} is not supported (MiniMax uses silu)")
    if d.get("sliding_window") not in (None, 0):
        raise ConfigError(f"sliding_window: {d['sliding_window']!r} is not supported")


def _common_fields(d: dict) -> dict:
    hidden = _require(d, "hidden_size")
    heads = _require(d, "num_attention_heads")
    head_dim = d.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else None)
    return {
        "vocab_size": _require(d, "vocab_size"),
        "hidden_size": hidden,
        "num_hidden_layers": _require(d, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": _require(d, "num_key_value_heads"),
        "head_dim": head_dim,
        "intermediate_size": _require(d, "intermediate_size"),
        "num_local_experts": _require(d, "num_local_experts"),
        "num_experts_per_tok": _require(d, "num_experts_per_tok"),
        "rms_norm_eps": _number(d, "rms_norm_eps", 1e-5),
        "max_position_embeddings": _require(d, "max_position_embeddings"),
        "block_size": d.get("block_size") or 256,
        "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
    }


def _original_fields(d: dict) -> dict:
    _no_shared_experts(d)
    f = _common_fields(d)
    types = _require(d, "attn_type_list")
    if not isinstance(types, list):
        raise ConfigError("attn_type_list: must be a list")
    layer_types = []
    for i, t in enumerate(types):
        if isinstance(t, bool) or t not in (0, 1):
            raise ConfigError(f"attn_type_list[{i}]: unknown layer type {t!r} (0 = lightning, 1 = softmax)")
        layer_types.append(LINEAR if t == 0 else FULL)
    f.update(
        layer_types=tuple(layer_types),
        rotary_dim=_require(d, "rotary_dim"),
        rope_theta=_number(d, "rope_theta"),
        linear_attn_alpha=_number(d, "layernorm_linear_attention_alpha"),
        linear_attn_beta=_number(d, "layernorm_linear_attention_beta"),
        full_attn_alpha=_number(d, "layernorm_full_attention_alpha"),
        full_attn_beta=_number(d, "layernorm_full_attention_beta"),
        mlp_alpha=_number(d, "layernorm_mlp_alpha"),
        mlp_beta=_number(d, "layernorm_mlp_beta"),
        postnorm=bool(d.get("postnorm", True)),
    )
    return f


def _transformers_fields(d: dict) -> dict:
    _no_shared_experts(d)
    f = _common_fields(d)
    types = _require(d, "layer_types")
    if not isinstance(types, list):
        raise ConfigError("layer_types: must be a list")
    for i, t in enumerate(types):
        if t not in (LINEAR, FULL):
            raise ConfigError(f"layer_types[{i}]: unknown layer type {t!r}")
    rope = d.get("rope_parameters") or {}
    theta = rope.get("rope_theta", d.get("rope_theta"))
    if theta is None:
        raise ConfigError("rope_parameters.rope_theta: missing")
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_parameters.rope_type: {rope['rope_type']!r} is not supported")
    if "rotary_dim" in d:
        rotary_dim = d["rotary_dim"]
    else:
        factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        rotary_dim = f["head_dim"] * factor if isinstance(f["head_dim"], int) else None
        if isinstance(rotary_dim, float):
            if not rotary_dim.is_integer():
                raise ConfigError(f"rope_parameters.partial_rotary_factor: {factor} x head_dim {f['head_dim']} "
                                  f"is not a whole number of dims")
            rotary_dim = int(rotary_dim)
    f.update(
        layer_types=tuple(types),
        rotary_dim=rotary_dim,
        rope_theta=_number({"rope_parameters.rope_theta": theta}, "rope_parameters.rope_theta"),
        linear_attn_alpha=_number(d, "linear_attn_alpha_factor", 1.0),
        linear_attn_beta=_number(d, "linear_attn_beta_factor", 1.0),
        full_attn_alpha=_number(d, "full_attn_alpha_factor", 1.0),
        full_attn_beta=_number(d, "full_attn_beta_factor", 1.0),
        mlp_alpha=_number(d, "mlp_alpha_factor", 1.0),
        mlp_beta=_number(d, "mlp_beta_factor", 1.0),
        postnorm=bool(d.get("postnorm", True)),
    )
    return f


def lightning_slopes(num_heads: int, layer: int, num_layers: int) -> list[float]:
    """Per-head decay rates s_h of one lightning layer: ALiBi slopes times the layer factor (HF-orig)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))  # = 2^(-8/n)
        return [start * start**i for i in range(n)]

    def alibi(n: int) -> list[float]:
        if math.log2(n).is_integer():
            return power_of_2(n)
        closest = 2 ** math.floor(math.log2(n))
        return power_of_2(closest) + alibi(2 * closest)[0::2][: n - closest]

    factor = 1 - layer / (num_layers - 1) + 1e-5 if num_layers > 1 else 1 + 1e-5
    return [s * factor for s in alibi(num_heads)]
