"""Every parameter of the Qwen2 decoder, described once.

One `Weight` record per parameter says everything the rest of the package needs to know about it: its
shape as a function of the config, its logical axes (what `rrm_jax.parallel` maps onto a device mesh),
its Hugging Face tensor name and how that tensor's layout relates to ours, and how a fresh model
initialises it. `qwen2` derives the parameters and their sharding metadata from these records (and
re-exports `LOGICAL_AXES` and `param_shapes`, which checkpoints and `rrm-jax plan` read), `hf` the
tensors of a Hugging Face folder, so a parameter's description changes in one place.

Shape letters: L layers, D hidden, N query heads, K kv heads, H head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

from rrm_jax.model.config import Qwen2Config

# How a freshly built model draws its matrices (loaded checkpoints never use this):
# "fan-in": std 1/sqrt(fan_in) for each matrix (fan_in = the input width it contracts: D for q/k/v,
#   gate and up, N*H for o, F for down) and 1/sqrt(D) for the embedding and the lm_head, so attention
#   and output logits start with std ~1. A small model learns from it (BENCHMARKS.md, toy init).
# "normal-0.02": Hugging Face's Qwen2 default, N(0, 0.02) for every matrix; at D=128 attention starts
#   uniform (logit std ~0.05) and the 2-layer toy judge does not learn its task even from true labels.
# Norm weights start at one and biases at zero under either.


def _dim_sizes(c: Qwen2Config) -> dict[str, int]:
    return {
        "L": c.num_layers,
        "D": c.hidden_size,
        "N": c.num_heads,
        "K": c.num_kv_heads,
        "H": c.head_dim,
        "F": c.intermediate_size,
        "V": c.vocab_size,
    }


@dataclasses.dataclass(frozen=True)
class Weight:
    """One parameter.

    hf_layout, how the HF tensor relates to ours:
        "same"   identical layout (embedding, norms)
        "flat"   HF flattens our trailing head dims (biases: [N, H] <-> [N*H])
        "linear" torch Linear weight [out, in] <-> ours [in..., out...] (transposed; the first `hf_in_dims`
                 dims of ours, after the layer axis, form HF's `in`, the rest its `out`)
    init: "ones" (norm weights), "zeros" (biases) or "normal" (matrices, drawn with std 1/sqrt(prod of the
    `fan_in` dims) under the "fan-in" initializer).
    """

    path: str  # state path; "layers.*" parameters are stacked along a leading [L] axis
    dims: str  # the shape rule: one letter of the module docstring per axis
    logical_axes: tuple[str, ...]  # one per axis
    hf_name: str  # "{i}" stands for the layer index
    hf_layout: str
    init: str
    fan_in: str = ""  # "normal" only: the dims a matrix contracts
    hf_in_dims: int = 1
    untied_only: bool = False  # absent when the config ties the lm_head to the embedding

    def __post_init__(self):
        assert len(self.dims) == len(self.logical_axes), self.path

    @property
    def stacked(self) -> bool:
        return self.path.startswith("layers.")

    def shape(self, c: Qwen2Config) -> tuple[int, ...]:
        sizes = _dim_sizes(c)
        return tuple(sizes[d] for d in self.dims)

    def fan_in_size(self, c: Qwen2Config) -> int:
        sizes = _dim_sizes(c)
        return math.prod(sizes[d] for d in self.fan_in)


def _layer(
    name: str, dims: str, axes: tuple[str, ...], hf: str, layout: str, init: str, fan_in: str = "", hf_in_dims: int = 1
) -> Weight:
    """A per-layer parameter: stacked along [L], the HF tensor named model.layers.{i}.<hf>."""
    return Weight(
        f"layers.{name}", "L" + dims, ("layers", *axes), f"model.layers.{{i}}.{hf}", layout, init, fan_in, hf_in_dims
    )


# In the order parameters are created (each draws the next key of a fresh model's rngs: reordering this
# table changes every seeded initialisation) and HF folders store them.
WEIGHTS = (
    Weight("embed", "VD", ("vocab", "embed"), "model.embed_tokens.weight", "same", "normal", fan_in="D"),
    _layer("attn_norm", "D", ("norm",), "input_layernorm.weight", "same", "ones"),
    _layer("q_proj", "DNH", ("embed", "q_heads", "head_dim"), "self_attn.q_proj.weight", "linear", "normal", "D"),
    _layer("q_bias", "NH", ("q_heads", "head_dim"), "self_attn.q_proj.bias", "flat", "zeros"),
    _layer("k_proj", "DKH", ("embed", "kv_heads", "head_dim"), "self_attn.k_proj.weight", "linear", "normal", "D"),
    _layer("k_bias", "KH", ("kv_heads", "head_dim"), "self_attn.k_proj.bias", "flat", "zeros"),
    _layer("v_proj", "DKH", ("embed", "kv_heads", "head_dim"), "self_attn.v_proj.weight", "linear", "normal", "D"),
    _layer("v_bias", "KH", ("kv_heads", "head_dim"), "self_attn.v_proj.bias", "flat", "zeros"),
    _layer(
        "o_proj",
        "NHD",
        ("q_heads", "head_dim", "embed"),
        "self_attn.o_proj.weight",
        "linear",
        "normal",
        "NH",
        hf_in_dims=2,
    ),
    _layer("mlp_norm", "D", ("norm",), "post_attention_layernorm.weight", "same", "ones"),
    _layer("gate_proj", "DF", ("embed", "mlp"), "mlp.gate_proj.weight", "linear", "normal", "D"),
    _layer("up_proj", "DF", ("embed", "mlp"), "mlp.up_proj.weight", "linear", "normal", "D"),
    _layer("down_proj", "FD", ("mlp", "embed"), "mlp.down_proj.weight", "linear", "normal", "F"),
    Weight("final_norm", "D", ("norm",), "model.norm.weight", "same", "ones"),
    Weight("lm_head", "DV", ("embed", "vocab"), "lm_head.weight", "linear", "normal", fan_in="D", untied_only=True),
)
BY_PATH = {w.path: w for w in WEIGHTS}

# state path -> logical axes
LOGICAL_AXES = {w.path: w.logical_axes for w in WEIGHTS}


def weights(c: Qwen2Config) -> tuple[Weight, ...]:
    """The parameters this config has, in creation order."""
    return tuple(w for w in WEIGHTS if not (w.untied_only and c.tie_word_embeddings))


def param_shapes(c: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """State path -> shape, for every parameter this config has."""
    return {w.path: w.shape(c) for w in weights(c)}
