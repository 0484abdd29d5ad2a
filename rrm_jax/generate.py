"""`rrm_jax.sample`: generation from token-id prompts, on the continuous-batching engine (`rrm_jax.engine`).

Every caller (the `generate`, `judge`, `rank` and `eval` commands, the GRPO rollout and evaluation)
goes through `sample`. Prompts are packed into a prefill token budget and prefilled once; their
`num_samples` rows take slots of the running batch as slots free up; each row writes its KV cache at its
own position and decodes until EOS or its own `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import NamedSharding

from rrm_jax import engine, pages
from rrm_jax.errors import UserError
from rrm_jax.model.config import Qwen2Config
from rrm_jax.sampling import (  # noqa: F401
    FINISH_EOS,
    FINISH_LENGTH,
    THINK_END_TEXT,
    Sample,
    SamplingSettings,
    bucket_length,
    check_prompts,
    filter_logits,
    make_settings,
    request_limits,
    resolve_eos_ids,
    think_end_ids,
)

# The engine's compiled programs (tests count their compilations).
prefill_fn = engine.prefill_fn
decode_fn = engine.decode_fn


def mesh_of(params):
    """The mesh a model's parameters are sharded over, or None for one device."""
    sharding = getattr(params["embed"], "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


def sample(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_samples: int = 1,
    seed: int = 0,
    eos_ids=None,
    max_think_tokens: int | None = None,
    tokenizer=None,
    think_end_ids_override=None,
    batch_size: int | None = None,
    buckets: Sequence[int] | None = None,
    progress=None,
    stats: engine.EngineStats | None = None,
    allowed_token_ids: Sequence[int] | None = None,
    prefill_tokens: int | None = None,
    kv_pool_gb: float | None = None,
) -> list[Sample]:
    """Generate from a list of token-id prompts. Returns num_samples results per prompt, prompt-major.

    max_new_tokens: one limit for every prompt, or a list with one per prompt.
    batch_size: prompts decoding at once (default: all); their rows are the engine's slots, refilled
    with the next waiting prompt as rows finish. Prompts are packed into one prefill token budget and
    slot counts rounded to a power of two, so a stream of varied requests reuses a few compilations.
    progress: optional callable, called with the number of prompts finished as they finish.
    stats: optional `engine.EngineStats`, filled with the engine's counters.
    prefill_tokens: the engine's prefill token budget (waiting prompts are packed into it; default per
    backend, `engine.PREFILL_TOKENS`).
    kv_pool_gb: the KV cache as a pool of pages, in GB per device, where the engine pages its cache (on
    accelerators and meshes; ignored on one CPU device, whose contiguous cache measured fastest): the rows
    decoding at once are then bounded by the tokens they hold (default: room for every slot at its cap).
    allowed_token_ids: a constrained vocabulary: the greedy choice, sampling and `logprobs` use the
    model's distribution renormalised over these tokens (the thinking budget's tokens are still forced).
    With a model sharded over the devices of several processes, every process calls this with the
    same prompts and gets every result back (the trainer gathers each step's prompts first)."""
    config: Qwen2Config = model.config
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {num_samples}")
    if not prompt_ids:
        return []
    limits = request_limits(max_new_tokens, len(prompt_ids))
    settings = make_settings(
        config,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_ids=eos_ids,
        max_think_tokens=max_think_tokens,
        tokenizer=tokenizer,
        think_end_ids_override=think_end_ids_override,
        allowed_token_ids=allowed_token_ids,
    )
    check_prompts(config, prompt_ids, limits)
    requests = [engine.Request([int(t) for t in p], m, i) for i, (p, m) in enumerate(zip(prompt_ids, limits))]
    params = model.params()
    max_rows = None if batch_size is None else batch_size * num_samples
    mesh = mesh_of(params)
    return engine.generate(
        config,
        settings,
        params,
        requests,
        num_samples=num_samples,
        seed=seed,
        max_rows=max_rows,
        mesh=mesh,
        buckets=buckets,
        tokenizer=tokenizer,
        progress=progress,
        stats=stats,
        prefill_tokens=prefill_tokens,
        kv_pages=pool_pages(config, mesh, kv_pool_gb),
    )


def pool_pages(config: Qwen2Config, mesh, kv_pool_gb: float | None) -> int | None:
    """The engine's kv_pages for a pool of kv_pool_gb GB on each device: pages of pages.PAGE_SIZE positions,
    each device holding its batch shard's pages for the kv heads tensor parallelism gives it. None without
    a pool or where the engine keeps a contiguous cache."""
    if kv_pool_gb is None or engine.decode_path(mesh) != "layers":
        return None
    if kv_pool_gb <= 0:
        raise UserError(f"kv_pool_gb={kv_pool_gb} must be a positive number of GB")
    tp = 1 if mesh is None else mesh.shape["tp"]
    per_device = config.kv_bytes_per_token // (tp if config.num_kv_heads % tp == 0 else 1)
    per_shard = pages.pages_in_budget(int(kv_pool_gb * 1e9), pages.PAGE_SIZE, per_device)
    return per_shard * (1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"])
