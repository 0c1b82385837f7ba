"""ModelConfig: both published config.json flavours, validation errors that name the field, lightning slopes."""

from __future__ import annotations

import copy
import json
import math

import pytest

from model_shards.config import FULL, LINEAR, ConfigError, ModelConfig, lightning_slopes
from model_shards.tiny import tiny_config

ALPHA = 3.5565588200778455
M1_SOFTMAX = {7, 15, 23, 31, 39, 47, 55, 63, 71, 79}


def m1_original() -> dict:
    """MiniMax-M1's published config.json (model.md section 1), original flavour."""
    return {
        "architectures": ["MiniMaxM1ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_minimax_m1.MiniMaxM1Config",
                     "AutoModelForCausalLM": "modeling_minimax_m1.MiniMaxM1ForCausalLM"},
        "model_type": "minimax_m1",
        "attention_dropout": 0.0,
        "attn_type_list": [1 if i in M1_SOFTMAX else 0 for i in range(80)],
        "bos_token_id": None, "eos_token_id": None,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 6144, "initializer_range": 0.02,
        "intermediate_size": 9216,
        "layernorm_full_attention_alpha": ALPHA, "layernorm_full_attention_beta": 1.0,
        "layernorm_linear_attention_alpha": ALPHA, "layernorm_linear_attention_beta": 1.0,
        "layernorm_mlp_alpha": ALPHA, "layernorm_mlp_beta": 1.0,
        "max_position_embeddings": 10240000, "num_attention_heads": 64, "num_experts_per_tok": 2,
        "num_hidden_layers": 80, "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False,
        "postnorm": True, "rms_norm_eps": 1e-05, "rope_theta": 10000000, "rotary_dim": 64,
        "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "shared_intermediate_size": 0,
        "shared_moe_mode": "sigmoid", "sliding_window": None, "tie_word_embeddings": False,
        "transformers_version": "4.45.2", "use_cache": True, "vocab_size": 200064,
    }


def m1_transformers() -> dict:
    """The same model in the transformers flavour (MiniMaxAI/*-hf style, model_type minimax)."""
    return {
        "architectures": ["MiniMaxForCausalLM"],
        "model_type": "minimax",
        "attention_dropout": 0.0,
        "layer_types": [FULL if i in M1_SOFTMAX else LINEAR for i in range(80)],
        "block_size": 256,
        "bos_token_id": None, "eos_token_id": None,
        "full_attn_alpha_factor": ALPHA, "full_attn_beta_factor": 1.0,
        "linear_attn_alpha_factor": ALPHA, "linear_attn_beta_factor": 1.0,
        "mlp_alpha_factor": ALPHA, "mlp_beta_factor": 1.0,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 6144, "initializer_range": 0.02,
        "intermediate_size": 9216, "max_position_embeddings": 10240000, "num_attention_heads": 64,
        "num_experts_per_tok": 2, "num_hidden_layers": 80, "num_key_value_heads": 8, "num_local_experts": 32,
        "output_router_logits": False, "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.5},
        "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "sliding_window": None,
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": 200064,
    }


EXPECTED_M1 = dict(
    vocab_size=200064, hidden_size=6144, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    head_dim=128, rotary_dim=64, rope_theta=1e7, intermediate_size=9216, num_local_experts=32,
    num_experts_per_tok=2, rms_norm_eps=1e-5, linear_attn_alpha=ALPHA, linear_attn_beta=1.0,
    full_attn_alpha=ALPHA, full_attn_beta=1.0, mlp_alpha=ALPHA, mlp_beta=1.0, max_position_embeddings=10240000,
    block_size=256, postnorm=True, tie_word_embeddings=False)


# ---- the two flavours ---------------------------------------------------------------------------------------------
def test_original_flavour_parses_m1():
    cfg = ModelConfig.from_dict(m1_original())
    for k, v in EXPECTED_M1.items():
        assert getattr(cfg, k) == v, k
    assert cfg.full_layers == sorted(M1_SOFTMAX)
    assert len(cfg.linear_layers) == 70
    assert cfg.q_size == 8192 and cfg.kv_size == 1024
    assert cfg.attn_alpha_beta(7) == (ALPHA, 1.0) and cfg.attn_alpha_beta(0) == (ALPHA, 1.0)


@pytest.mark.parametrize("model_type", ["minimax_m1", "minimax_text_01"])
def test_original_model_types(model_type):
    d = m1_original()
    d["model_type"] = model_type
    assert ModelConfig.from_dict(d) == ModelConfig.from_dict(m1_original())


def test_transformers_flavour_equals_original():
    orig = ModelConfig.from_dict(m1_original())
    tf = ModelConfig.from_dict(m1_transformers())
    assert tf == orig


def test_transformers_flavour_rotary_dim_extra_key():
    orig = ModelConfig.from_dict(m1_original())
    d = m1_transformers()
    d["rotary_dim"] = 64  # the -hf repos keep rotary_dim / postnorm as extra keys
    d["postnorm"] = True
    assert ModelConfig.from_dict(d) == orig
    del d["rope_parameters"]["partial_rotary_factor"]  # rotary_dim alone is enough
    assert ModelConfig.from_dict(d) == orig


def test_transformers_flavour_without_partial_rotary_is_full_rope():
    d = m1_transformers()
    del d["rope_parameters"]["partial_rotary_factor"]
    assert ModelConfig.from_dict(d).rotary_dim == 128


def test_transformers_flavour_alpha_factors_are_read():
    """The *_alpha_factor keys must not silently fall back to 1 (model.md 0.3c)."""
    d = m1_transformers()
    d["full_attn_alpha_factor"], d["linear_attn_beta_factor"], d["mlp_alpha_factor"] = 2.0, 0.5, 3.0
    cfg = ModelConfig.from_dict(d)
    assert (cfg.full_attn_alpha, cfg.linear_attn_beta, cfg.mlp_alpha) == (2.0, 0.5, 3.0)
    assert cfg.attn_alpha_beta(7) == (2.0, 1.0) and cfg.attn_alpha_beta(6) == (ALPHA, 0.5)


def test_transformers_library_serialisation_parses(tmp_path):
    """What transformers' own MiniMaxConfig writes (save_pretrained) parses to the same model."""
    import transformers

    from model_shards.transformers_compat import to_hf_config

    tiny = tiny_config(num_layers=6, full_attention_every=3, rotary_dim=8)
    to_hf_config(tiny.to_dict()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "minimax" and "layer_types" in saved
    assert isinstance(transformers.MiniMaxConfig.from_pretrained(tmp_path), transformers.MiniMaxConfig)
    assert ModelConfig.from_file(tmp_path) == tiny


def test_to_dict_round_trip_and_from_file(tmp_path):
    cfg = ModelConfig.from_dict(m1_original())
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "config.json").write_text(json.dumps(m1_transformers()))
    assert ModelConfig.from_file(tmp_path) == cfg
    assert ModelConfig.from_file(tmp_path / "config.json") == cfg
    tiny = tiny_config()
    assert ModelConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny


def test_head_dim_defaults_to_hidden_over_heads():
    d = m1_original()
    del d["head_dim"]
    assert ModelConfig.from_dict(d).head_dim == 6144 // 64


# ---- errors name the field ----------------------------------------------------------------------------------------
FLAVOURS = {"original": m1_original, "transformers": m1_transformers}


def expect_error(d: dict, *words: str) -> str:
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                                 "num_hidden_layers", "intermediate_size", "num_local_experts",
                                 "num_experts_per_tok"])
def test_missing_field(flavour, key):
    d = FLAVOURS[flavour]()
    del d[key]
    expect_error(d, key)


@pytest.mark.parametrize("key", ["attn_type_list", "rotary_dim", "rope_theta", "layernorm_mlp_alpha",
                                 "layernorm_full_attention_beta"])
def test_missing_original_field(key):
    d = m1_original()
    del d[key]
    expect_error(d, key)


def test_missing_transformers_fields():
    d = m1_transformers()
    del d["layer_types"]
    expect_error(d, "layer_types")
    d = m1_transformers()
    del d["rope_parameters"]
    expect_error(d, "rope_theta")


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kv", [3, 48, 7])
def test_kv_heads_must_divide(flavour, kv):
    d = FLAVOURS[flavour]()
    d["num_key_value_heads"] = kv
    expect_error(d, "num_key_value_heads", str(kv))


@pytest.mark.parametrize("bad", [2, -1, "linear"])
def test_unknown_attn_type(bad):
    d = m1_original()
    d["attn_type_list"][5] = bad
    expect_error(d, "attn_type_list[5]", repr(bad))


@pytest.mark.parametrize("bad", ["sliding_attention", "lightning", 0])
def test_unknown_layer_type(bad):
    d = m1_transformers()
    d["layer_types"][3] = bad
    expect_error(d, "layer_types[3]", repr(bad))


def test_layer_list_length_must_match():
    d = m1_original()
    d["attn_type_list"] = d["attn_type_list"][:79]
    expect_error(d, "79", "80")
    d = m1_transformers()
    d["layer_types"].append(LINEAR)
    expect_error(d, "81", "80")


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("value", [1024, [0, 512]])
def test_shared_experts_rejected(flavour, value):
    d = FLAVOURS[flavour]()
    d["shared_intermediate_size"] = value
    expect_error(d, "shared_intermediate_size")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_shared_experts_zero_ok(flavour):
    d = FLAVOURS[flavour]()
    d["shared_intermediate_size"] = 0
    ModelConfig.from_dict(d)


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "minimax_m2", None])
def test_unknown_model_type(model_type):
    d = m1_original()
    if model_type is None:
        del d["model_type"]
    else:
        d["model_type"] = model_type
    expect_error(d, "model_type", repr(model_type))


def test_not_an_object():
    with pytest.raises(ConfigError):
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_bad_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(m1_original())[:-10])
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(tmp_path)
    assert str(p) in str(e.value) and "JSON" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(tmp_path)
    assert "config.json" in str(e.value)


def test_file_errors_name_file_and_field(tmp_path):
    d = m1_original()
    d["num_key_value_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(tmp_path)
    assert str(tmp_path) in str(e.value) and "num_key_value_heads" in str(e.value)


@pytest.mark.parametrize("rotary_dim", [63, 1, 130, 256, 0, -2])
def test_bad_rotary_dim_original(rotary_dim):
    d = m1_original()
    d["rotary_dim"] = rotary_dim
    expect_error(d, "rotary_dim", str(rotary_dim))


@pytest.mark.parametrize("rotary_dim", [63, 256])
def test_bad_rotary_dim_transformers_extra_key(rotary_dim):
    d = m1_transformers()
    d["rotary_dim"] = rotary_dim
    expect_error(d, "rotary_dim", str(rotary_dim))


@pytest.mark.parametrize("factor, dim", [(1.5, 192), (65 / 128, 65)])
def test_bad_partial_rotary_factor(factor, dim):
    d = m1_transformers()
    d["rope_parameters"]["partial_rotary_factor"] = factor
    expect_error(d, "rotary_dim", str(dim))


def test_other_validation():
    d = m1_original()
    d["num_experts_per_tok"] = 33
    expect_error(d, "num_experts_per_tok")
    d = m1_original()
    d["hidden_size"] = 0
    expect_error(d, "hidden_size")
    d = m1_original()
    d["tie_word_embeddings"] = True
    expect_error(d, "tie_word_embeddings")
    d = m1_original()
    d["postnorm"] = False
    expect_error(d, "postnorm")
    d = m1_transformers()
    d["rope_parameters"]["rope_type"] = "yarn"
    expect_error(d, "rope_type")
    d = m1_original()
    d["hidden_act"] = "gelu"
    expect_error(d, "hidden_act")


def test_input_dict_not_mutated():
    d = m1_transformers()
    before = copy.deepcopy(d)
    ModelConfig.from_dict(d)
    assert d == before


# ---- lightning slopes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("H", [1, 2, 4, 8, 16, 64])
@pytest.mark.parametrize("layer, L", [(0, 80), (5, 80), (78, 80), (79, 80), (0, 8), (6, 8), (3, 4)])
def test_slopes_power_of_two(H, layer, L):
    got = lightning_slopes(H, layer, L)
    want = [2 ** (-8 * (h + 1) / H) * (1 - layer / (L - 1) + 1e-5) for h in range(H)]
    assert len(got) == H
    for g, w in zip(got, want):
        assert math.isclose(g, w, rel_tol=1e-12), (got, want)


def test_slopes_m1_values():
    """model.md section 3: layer 0 head 0 = 0.917, head 63 = 0.0039; layer 79 factor 1e-5."""
    s0 = lightning_slopes(64, 0, 80)
    assert math.isclose(s0[0], 2 ** -0.125 * (1 + 1e-5), rel_tol=1e-12) and abs(s0[0] - 0.917) < 1e-3
    assert abs(s0[63] - 0.0039) < 1e-4
    s79 = lightning_slopes(64, 79, 80)
    assert math.isclose(s79[0], 2 ** -0.125 * 1e-5, rel_tol=1e-9)
    s78 = lightning_slopes(64, 78, 80)
    assert abs(s78[0] - 0.0116) < 1e-4 and abs(s78[63] - 4.9e-5) < 1e-6


def _alibi_get_slopes(n):
    """ALiBi's get_slopes, as in HF-orig's _build_slope_tensor (written independently here)."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + _alibi_get_slopes(2 * c)[0::2][: n - c]


def test_slopes_six_heads_interleave():
    four = [2 ** (-8 * (h + 1) / 4) for h in range(4)]
    eight = [2 ** (-8 * (h + 1) / 8) for h in range(8)]
    factor = 1 - 2 / 7 + 1e-5
    want = [s * factor for s in four + [eight[0], eight[2]]]
    got = lightning_slopes(6, 2, 8)
    assert len(got) == 6
    for g, w in zip(got, want):
        assert math.isclose(g, w, rel_tol=1e-12), (got, want)


@pytest.mark.parametrize("H", [3, 5, 6, 12, 20, 24, 48, 96])
def test_slopes_non_power_of_two(H):
    got = lightning_slopes(H, 0, 80)
    want = [s * (1 + 1e-5) for s in _alibi_get_slopes(H)]
    assert len(got) == H
    for g, w in zip(got, want):
        assert math.isclose(g, w, rel_tol=1e-12)
    assert len(set(got)) == H  # all distinct


def test_slopes_single_layer_model():
    assert lightning_slopes(4, 0, 1) == pytest.approx([2 ** (-2 * (h + 1)) * (1 + 1e-5) for h in range(4)])


# ---- wrongly typed values -----------------------------------------------------------------------------------------
WRONG_TYPES = [
    ("original", "rope_theta", "ten million"),
    ("original", "rms_norm_eps", None),
    ("original", "layernorm_mlp_alpha", "x"),
    ("original", "shared_intermediate_size", "0"),
    ("transformers", "rotary_dim", None),
    ("transformers", "mlp_alpha_factor", [1.0]),
]


@pytest.mark.parametrize("flavour, key, value", WRONG_TYPES)
def test_wrongly_typed_value_is_config_error(flavour, key, value):
    d = FLAVOURS[flavour]()
    d[key] = value
    expect_error(d, key)


@pytest.mark.parametrize("flavour, key, value", WRONG_TYPES)
def test_wrongly_typed_value_is_rejected(flavour, key, value):
    d = FLAVOURS[flavour]()
    d[key] = value
    with pytest.raises((ValueError, TypeError)):
        ModelConfig.from_dict(d)
