"""Compile time of the forward pass and the engine's decode chunk against depth (layers are scanned, so it should
not grow with depth). Abstract parameters: nothing is allocated, only compiled.

    .venv/bin/python benchmarks/compile_depth.py
"""

import time

import jax
import jax.numpy as jnp

from rrm_jax import engine
from rrm_jax.model import qwen2
from rrm_jax.model.config import preset
from rrm_jax.sampling import SamplingSettings


def abstract_params(config):
    dtype = jnp.dtype(config.param_dtype)
    flat = {path: jax.ShapeDtypeStruct(shape, dtype) for path, shape in qwen2.param_shapes(config).items()}
    params = {k: v for k, v in flat.items() if not k.startswith("layers.")}
    params["layers"] = {k.removeprefix("layers."): v for k, v in flat.items() if k.startswith("layers.")}
    return params


def compile_seconds(config):
    params = abstract_params(config)
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    t = time.perf_counter()
    jax.jit(lambda p, x: qwen2.forward(config, p, x)).lower(params, tokens).compile()
    forward_s = time.perf_counter() - t

    settings = SamplingSettings(0.0, 0, 1.0, (), None, ())
    decode_s = {}
    for path, attention, decode_params in (
        ("rows", None, params),
        ("layers", "xla", jax.eval_shape(qwen2.unstack_layers, params)),
    ):
        state = jax.eval_shape(lambda path=path: engine._empty_state(config, 8, 320, None, path))
        t = time.perf_counter()
        engine.decode_fn.lower(
            config,
            settings,
            engine.CHUNK_STEPS,
            engine.ATTENTION_BLOCK,
            attention,
            None,
            decode_params,
            state,
            jax.ShapeDtypeStruct((), jnp.int32),
        ).compile()
        decode_s[path] = time.perf_counter() - t
    return forward_s, decode_s


if __name__ == "__main__":
    base = preset("r1-distill-qwen-1.5b").replace(param_dtype="bfloat16", dtype="bfloat16")
    for layers in (2, 28):
        fwd, dec = compile_seconds(base.replace(num_layers=layers))
        print(
            f"layers={layers:2d} forward_compile_s={fwd:.2f} decode_chunk_compile_s rows (layers scanned)="
            f"{dec['rows']:.2f} layers (unrolled)={dec['layers']:.2f}",
            flush=True,
        )
