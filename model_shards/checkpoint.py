"""Reading MiniMax checkpoints: model.safetensors.index.json + shards, in original or transformers naming.

This module alone knows tensor names. Every read goes through the index to exactly the tensors asked for
(safetensors reads each tensor's byte range on its own), so a router that loads only the non-expert part, or a
shard that loads only its experts, never touches the rest of a 900 GB checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import LINEAR, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    pass


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def attention_names(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Original names and shapes of one layer's attention weights."""
    p, H = layer_prefix(layer) + "self_attn.", cfg.hidden_size
    if cfg.layer_types[layer] == LINEAR:
        return {p + "qkv_proj.weight": (3 * cfg.q_size, H), p + "output_gate.weight": (cfg.q_size, H),
                p + "norm.weight": (cfg.q_size,), p + "out_proj.weight": (H, cfg.q_size)}
    return {p + "q_proj.weight": (cfg.q_size, H), p + "k_proj.weight": (cfg.kv_size, H),
            p + "v_proj.weight": (cfg.kv_size, H), p + "o_proj.weight": (H, cfg.q_size)}


def router_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Original names and shapes of every non-expert tensor (what the router deployment holds)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    names = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for layer in range(cfg.num_hidden_layers):
        p = layer_prefix(layer)
        names[p + "input_layernorm.weight"] = (H,)
        names[p + "post_attention_layernorm.weight"] = (H,)
        names.update(attention_names(cfg, layer))
        names[p + "block_sparse_moe.gate.weight"] = (cfg.num_local_experts, H)
    return names


def _transformers_name(name: str) -> str:
    return name.replace(".block_sparse_moe.", ".mlp.")


class Checkpoint:
    """An opened checkpoint folder. Reads tensors by name; files are opened lazily, once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        elif (self.path / SINGLE_FILE).exists():
            with self._open_file(SINGLE_FILE) as f:
                weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise CheckpointError(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self.weight_map: dict[str, str] = weight_map
        self.transformers_naming = any(".mlp.experts." in n for n in weight_map)
        self._files: dict[str, object] = {}
        self.bytes_read = 0

    # ---- raw access ------------------------------------------------------------------------------------
    def _open_file(self, filename: str):
        path = self.path / filename
        if not path.exists():
            raise CheckpointError(f"{path}: shard file listed in the index is missing")
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot open safetensors file ({e})") from None

    def _file(self, filename: str):
        if filename not in self._files:
            self._files[filename] = self._open_file(filename).__enter__()
        return self._files[filename]

    def _stored_name(self, name: str) -> str:
        if name in self.weight_map:
            return name
        alt = _transformers_name(name)
        if alt in self.weight_map:
            return alt
        raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint index")

    def read(self, name: str, shape: tuple[int, ...] | None = None, rows: slice | None = None) -> torch.Tensor:
        """One tensor (or rows of its first dimension), checked against the expected shape of the whole tensor."""
        stored = self._stored_name(name)
        filename = self.weight_map[stored]
        where = f"{self.path / filename}: tensor {stored!r}"
        try:
            f = self._file(filename)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (while reading tensor {stored!r})") from None
        try:
            sliced = f.get_slice(stored)
            stored_shape = tuple(sliced.get_shape())
            if shape is not None and stored_shape != tuple(shape):
                raise CheckpointError(f"{where} has shape {stored_shape}, expected {tuple(shape)}")
            t = sliced[rows] if rows is not None else f.get_tensor(stored)
        except CheckpointError:
            raise
        except SafetensorError as e:
            raise CheckpointError(f"{where} cannot be read ({e})") from None
        except Exception as e:  # truncated files surface as various errors from the mmap'd read
            raise CheckpointError(f"{where} is corrupt or the file is truncated ({type(e).__name__}: {e})") from None
        self.bytes_read += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        for f in self._files.values():
            f.__exit__(None, None, None)
        self._files.clear()

    # ---- the two partial loads -------------------------------------------------------------------------
    def load_router_part(self, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Every non-expert tensor, by original name."""
        return {name: self.read(name, shape) for name, shape in router_names(cfg).items()}

    def load_experts(self, cfg: ModelConfig, layer: int, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts [first, last) of one layer as w13 [E, 2F, H] (w1 gate rows, then w3 up rows) and w2 [E, H, F]."""
        if not 0 <= first < last <= cfg.num_local_experts:
            raise CheckpointError(f"expert range [{first}, {last}) outside 0..{cfg.num_local_experts}")
        H, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
        p = layer_prefix(layer)
        if self.transformers_naming:
            rows = slice(first, last)
            return (self.read(p + "mlp.experts.gate_up_proj", (E, 2 * F, H), rows),
                    self.read(p + "mlp.experts.down_proj", (E, H, F), rows))
        w13, w2 = [], []
        for e in range(first, last):
            q = f"{p}block_sparse_moe.experts.{e}."
            w13.append(torch.cat([self.read(q + "w1.weight", (F, H)), self.read(q + "w3.weight", (F, H))]))
            w2.append(self.read(q + "w2.weight", (H, F)))
        return torch.stack(w13), torch.stack(w2)
