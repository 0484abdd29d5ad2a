"""Qwen2 decoder configuration and presets named after released checkpoints."""

from __future__ import annotations

import dataclasses

from rrm_jax.errors import UserError

DTYPES = ("float32", "bfloat16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # itemsize by canonical name, without importing numpy or jax
INITIALIZERS = ("fan-in", "normal-0.02")  # how qwen2.Qwen2 draws random weights
_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def dtype_name(value, what: str = "dtype") -> str:
    """The canonical name ("float32" / "bfloat16") of a dtype as JAX users spell it: "bfloat16", "bf16",
    jnp.bfloat16, np.dtype("float32"), jnp.float32, np.float32, "jnp.float32"."""
    if isinstance(value, str):
        name = value.strip().lower()
        for prefix in ("jax.numpy.", "jnp.", "numpy.", "np.", "torch."):
            name = name.removeprefix(prefix)
    else:
        name = getattr(value, "name", None) or getattr(getattr(value, "dtype", None), "name", None)
        if name is None:
            try:  # numpy scalar types (np.float32) and jnp's (jnp.bfloat16, with ml_dtypes)
                import numpy as np

                name = np.dtype(value).name
            except TypeError:
                name = None
    if name not in _DTYPE_ALIASES:
        raise UserError(
            f"{what}={value!r} is not supported; use one of {', '.join(DTYPES)} "
            f"(a name, jnp.{DTYPES[1]} or np.dtype({DTYPES[0]!r}) alike)"
        )
    return _DTYPE_ALIASES[name]


def dtype_arg(text: str) -> str:
    """argparse type of a --dtype flag: any spelling `dtype_name` accepts (bf16, jnp.bfloat16, ...)."""
    import argparse

    try:
        return dtype_name(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # hidden_size // num_heads when None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    param_dtype: str = "float32"  # storage dtype of the weights
    dtype: str = "float32"  # compute dtype of activations (norms, softmax and logits stay float32)

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):  # HF writes a list; a tuple keeps the config hashable (jit static)
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for key in ("param_dtype", "dtype"):  # stored by name: hashable (a jit static) and JSON-able
            object.__setattr__(self, key, dtype_name(getattr(self, key), f"model {key}"))
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

    def replace(self, **changes) -> Qwen2Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        return d

    @property
    def eos_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @classmethod
    def from_dict(cls, d: dict) -> Qwen2Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config keys {unknown}; valid keys: {', '.join(sorted(known))}")
        return cls(**d)

    @property
    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * h, self.num_kv_heads * h
        per_layer = 2 * d + d * q + q + 2 * (d * kv + kv) + q * d + 3 * d * f
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_layers * per_layer + d

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token position holds over the whole model: keys and values of every
        layer and KV head, in the compute dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]


# DeepSeek-R1-Distill-Qwen shapes (RRM-7B / RRM-32B are fine-tunes of the 7B / 32B ones).
PRESETS: dict[str, Qwen2Config] = {
    "r1-distill-qwen-1.5b": Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        bos_token_id=151646,
        eos_token_id=151643,
    ),
    "r1-distill-qwen-7b": Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        bos_token_id=151646,
        eos_token_id=151643,
    ),
    "r1-distill-qwen-32b": Qwen2Config(
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_layers=64,
        num_heads=40,
        num_kv_heads=8,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        bos_token_id=151646,
        eos_token_id=151643,
    ),
    # A ~100M-parameter shape for CPU sampling benchmarks.
    "qwen2-100m": Qwen2Config(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    # A ~40M-parameter shape for the CPU benchmark of ragged, RRM-shaped generation.
    "qwen2-40m": Qwen2Config(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    "tiny": Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
}


def preset(name: str) -> Qwen2Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]
