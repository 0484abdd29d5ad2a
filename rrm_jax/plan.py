"""Per-device memory plan of a GRPO training config: `rrm-jax plan --config FILE`.

Estimates, per device, what `rrm-jax train` keeps in memory, and refuses a config that cannot fit.
The sharding is the one the trainer uses: each parameter's logical axes (rrm_jax.model.qwen2
LOGICAL_AXES) mapped onto the (data, fsdp, tp) mesh by rrm_jax.parallel RULES, so the large weights
are split over fsdp (hidden dimension) and tp (heads, MLP width, vocabulary) and replicated over
data; a dimension the mesh axis does not divide stays replicated. Activations and the KV cache
split the batch over data*fsdp and heads / vocabulary over tp.

Terms (bytes per device). P: parameter bytes in param_dtype on this device's shard; a: bytes of the
compute dtype; T = data.max_prompt_len + rollout.max_new_tokens (the padded sequence length);
R = rollout.prompts_per_step * rollout.samples_per_prompt sequences per step;
b = ceil(R / loss.micro_batches / (data*fsdp)) sequences per device in one micro-batch, t = b*T;
N', K', F', V' = heads, kv heads, MLP width, vocabulary divided by tp where tp divides them.
  parameters          P
  gradients           P, or 2P with micro_batches > 1 (the accumulator plus one micro-batch's gradient)
  optimizer state     2P (AdamW's two moments, stored in the parameter dtype by optax)
  reference model     P when loss.kl_coef > 0 (a frozen copy of the starting policy)
  activations         with loss.remat: every layer's input, L*t*D*a, plus one layer's working set;
                      without: L working sets. Working set = attention probabilities and their
                      gradient in float32, 2*b*N'*T*T*4, plus the MLP and projections,
                      t*(3F' + 2N'H + 2K'H)*a
  logits              2*t*V'*4 (float32 logits and their gradient)
  rollout KV cache    2*L*ceil(R / (data*fsdp))*T*K'*H*a (keys and values for every sampled sequence)
With a judge reward (reward.type=judge) the frozen judge stays on the same devices for the whole run:
  judge parameters    its weights' shard (sharded by the same rules; reward.dtype, else as stored)
  judge KV cache      2*L_j*r_j*T_j*K_j'*H_j*a_j, r_j = ceil(judge rows decoding at once / (data*fsdp)):
                      the first round's comparisons (round_robin / elo B*G(G-1)/2, circular / reference
                      B*G, knockout B*(G - byes)/2) times the shown orders (2 with both_orders) times
                      reward.votes, at most reward.batch_size * votes; T_j = the judge's prompt (policy
                      prompt + two responses + JUDGE_TEMPLATE_TOKENS for the RRM instructions) + its
                      reward.max_new_tokens (8192 when unset), at most the judge's context.
The update phase holds parameters, gradients, optimizer state, reference, activations and logits;
the rollout phase parameters, optimizer state, reference and the KV cache; the judging phase (with a
judge reward) parameters, optimizer state, reference and the judge's KV cache; the judge's weights
are in every phase. The peak of the phases is compared with the device memory. XLA's temporary buffers and fragmentation come on top: leave
~10-15% headroom.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from rrm_jax.errors import UserError
from rrm_jax.model.config import PRESETS, Qwen2Config
from rrm_jax.pages import pool_floor
from rrm_jax.rl.config import JUDGE_REWARD, TrainConfig, load_config
from rrm_jax.sizes import next_power_of_two

GB = 1e9
# The RRM system prompt, user template and suffix around the query and responses: 1,808 characters, 283
# words, so about 450 tokens at ~4 characters a token (an estimate: no R1 tokenizer here to count with),
# plus the chat template's markers; 640 leaves a margin.
JUDGE_TEMPLATE_TOKENS = 640


@dataclasses.dataclass(frozen=True)
class Term:
    key: str  # stable name (tests, JSON)
    label: str
    bytes: float
    phase: str  # "both" (every phase), "update", "rollout" or "judging"
    remedy: str  # what to change when this term is the largest one of a config that does not fit


@dataclasses.dataclass(frozen=True)
class Concurrency:
    """The traces of a decoding phase that run at once in its KV memory, per batch shard (data*fsdp), for
    traces of a given mean length."""

    phase: str  # "rollout" or "judging"
    sequences: int  # the phase's sequences per batch shard
    at_once: int  # of them decoding at once
    cap_slots: int  # traces that cap-sized slots (a contiguous cache) would hold in the same memory
    prompt_tokens: int  # the prompt length assumed (the configured maximum)
    new_tokens_cap: int
    mean_new_tokens: int
    samples: int  # rows a prompt's pages are shared by
    pool_pages: int | None  # pages per device, None for a contiguous cache
    page_size: int


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    model: Qwen2Config
    mesh: tuple[int, int, int]  # (data, fsdp, tp)
    terms: tuple[Term, ...]
    micro_batch_sequences: int  # b
    rollout_sequences: int  # per device
    sequence_length: int  # T
    concurrency: tuple[Concurrency, ...] = ()

    def term(self, key: str) -> float:
        return next(t.bytes for t in self.terms if t.key == key)

    def phase_total(self, phase: str) -> float:
        return sum(t.bytes for t in self.terms if t.phase in ("both", phase))

    @property
    def phases(self) -> tuple[str, ...]:
        return ("update", "rollout") + (("judging",) if any(t.phase == "judging" for t in self.terms) else ())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak(self) -> float:
        return self.phase_total(self.peak_phase)

    @property
    def largest(self) -> Term:
        return max((t for t in self.terms if t.phase in ("both", self.peak_phase)), key=lambda t: t.bytes)


def model_shape(c: TrainConfig) -> Qwen2Config:
    """The model `rrm-jax train` would build for this config, with the config's dtypes."""
    m = c.model
    if m.init is None:
        from rrm_jax.rl.tokenizer import load_train_tokenizer  # the vocabulary size comes from the tokenizer

        base = m.shape(len(load_train_tokenizer(c.tokenizer)))
    elif m.init in PRESETS:
        base = PRESETS[m.init]
    else:
        base = _stored_model_config(Path(m.init))
    return base.replace(param_dtype=m.param_dtype, dtype=m.dtype)


def judge_shape(c: TrainConfig) -> Qwen2Config | None:
    """The judge of a judge reward (a folder, or for planning without the weights a preset name), or None."""
    if c.reward.type != JUDGE_REWARD:
        return None
    r = c.reward
    base = PRESETS[r.judge] if r.judge in PRESETS else _stored_model_config(Path(r.judge), "reward.judge")
    return base.replace(param_dtype=r.dtype, dtype=r.dtype) if r.dtype else base


def _stored_model_config(path: Path, key: str = "model.init") -> Qwen2Config:
    from rrm_jax import checkpoint
    from rrm_jax.model import hf

    if not path.exists():
        raise UserError(
            f"{key}={str(path)!r} does not exist on this machine; to plan without the weights, "
            f"give the preset of the same shape, e.g. {key}=r1-distill-qwen-7b "
            f"(presets: {', '.join(PRESETS)})"
        )
    if hf.is_hf_folder(path):
        return hf.read_hf_config(path)
    return checkpoint.read_checkpoint_config(checkpoint.resolve_checkpoint(path))


def plan_memory(
    c: TrainConfig,
    model: Qwen2Config,
    judge: Qwen2Config | None = None,
    *,
    mean_new_tokens: int | None = None,
    judge_mean_new_tokens: int | None = None,
) -> MemoryPlan:
    """mean_new_tokens / judge_mean_new_tokens: the mean trace length the concurrency is reported for
    (default a fifth of each cap: RRM traces hold about that on average)."""
    import jax.numpy as jnp  # jax only once there is something to plan: `rrm-jax plan --help` stays instant
    from jax.sharding import AbstractMesh

    from rrm_jax import parallel
    from rrm_jax.model.qwen2 import LOGICAL_AXES, param_shapes
    from rrm_jax.pages import PAGE_SIZE

    data, fsdp, tp = c.mesh.data, c.mesh.fsdp, c.mesh.tp
    mesh = AbstractMesh((data, fsdp, tp), parallel.MESH_AXES)
    a_bytes = jnp.dtype(model.dtype).itemsize

    def shard_bytes(m: Qwen2Config) -> float:
        total = 0.0
        for path, shape in param_shapes(m).items():
            spec = parallel.logical_to_spec(LOGICAL_AXES[path], mesh, shape)
            total += math.prod(shape) / _shard_count(spec, mesh) * jnp.dtype(m.param_dtype).itemsize
        return total

    param_bytes = shard_bytes(model)

    def split(n: int) -> int:  # a tp-sharded dimension, replicated when tp does not divide it
        return n // tp if n % tp == 0 else n

    L, D, H = model.num_layers, model.hidden_size, model.head_dim
    N, K, F, V = (
        split(model.num_heads),
        split(model.num_kv_heads),
        split(model.intermediate_size),
        split(model.vocab_size),
    )
    T = c.data.max_prompt_len + c.rollout.max_new_tokens
    rollout = c.rollout.prompts_per_step * c.rollout.samples_per_prompt
    b = math.ceil(rollout / c.loss.micro_batches / (data * fsdp))
    t = b * T
    layer_input = t * D * a_bytes
    working_set = 2 * b * N * T * T * 4 + t * (3 * F + 2 * N * H + 2 * K * H) * a_bytes
    activations = L * layer_input + working_set if c.loss.remat else L * working_set
    rollout_rows = math.ceil(rollout / (data * fsdp))
    kv_token = 2 * L * K * H * a_bytes  # one position's keys and values on one device
    R = c.rollout
    rollout_concurrency = _concurrency(
        "rollout",
        rollout_rows,
        c.data.max_prompt_len,
        R.max_new_tokens,
        mean_new_tokens if mean_new_tokens is not None else R.max_new_tokens // 5,
        R.samples_per_prompt,
        kv_token,
        R.kv_pool_gb,
        PAGE_SIZE,
    )
    rollout_bytes = _phase_kv_bytes(rollout_concurrency, kv_token)

    weights_remedy = (
        "use more devices with a larger mesh.fsdp (parameters, gradients and optimizer state shard over fsdp*tp)"
    )
    per_micro_batch = "raise loss.micro_batches" if b > 1 else "lower data.max_prompt_len or rollout.max_new_tokens"
    terms = (
        Term("params", f"parameters ({model.param_dtype})", param_bytes, "both", weights_remedy),
        Term(
            "grads",
            "gradients" + (" (accumulator + micro-batch)" if c.loss.micro_batches > 1 else ""),
            param_bytes * (2 if c.loss.micro_batches > 1 else 1),
            "update",
            weights_remedy,
        ),
        Term("optimizer", "optimizer state (AdamW, 2 moments)", 2 * param_bytes, "both", weights_remedy),
        Term(
            "reference",
            "reference model (loss.kl_coef > 0)",
            param_bytes if c.loss.kl_coef > 0 else 0.0,
            "both",
            "set loss.kl_coef=0 (no reference model) or " + weights_remedy,
        ),
        Term(
            "activations",
            f"activations ({'remat' if c.loss.remat else 'no remat'}, {b} x {T} tokens)",
            activations,
            "update",
            "set loss.remat=true"
            if not c.loss.remat
            else f"{per_micro_batch} or raise mesh.tp (splits attention heads and MLP)",
        ),
        Term(
            "logits",
            f"logits (float32, {b} x {T} tokens)",
            2 * t * V * 4,
            "update",
            f"{per_micro_batch} or raise mesh.tp (splits the vocabulary)",
        ),
        _kv_term(
            "kv_cache",
            "rollout",
            rollout_concurrency.pool_pages,
            rollout_bytes,
            f"{rollout_rows} x {T} tokens",
            "lower rollout.prompts_per_step or rollout.max_new_tokens, or use more devices "
            "(the cache splits its sequences over mesh.data*fsdp)",
            "lower rollout.kv_pool_gb (fewer traces decode at once), or use more devices",
        ),
    )
    concurrency = (rollout_concurrency,)
    if judge is not None:
        r, G = c.reward, c.rollout.samples_per_prompt
        rows = _judge_rows(r.strategy, c.rollout.prompts_per_step, G) * (2 if r.both_orders else 1)
        if r.batch_size is not None:
            rows = min(rows, r.batch_size)
        judge_rows = math.ceil(rows * r.votes / (data * fsdp))
        new_tokens = r.max_new_tokens or 8192
        T_j = min(
            c.data.max_prompt_len + 2 * c.rollout.max_new_tokens + JUDGE_TEMPLATE_TOKENS + new_tokens,
            judge.max_position_embeddings,
        )
        j_token = 2 * judge.num_layers * split(judge.num_kv_heads) * judge.head_dim * jnp.dtype(judge.dtype).itemsize
        judge_concurrency = _concurrency(
            "judging",
            judge_rows,
            T_j - new_tokens,
            new_tokens,
            judge_mean_new_tokens if judge_mean_new_tokens is not None else new_tokens // 5,
            r.votes,
            j_token,
            r.kv_pool_gb,
            PAGE_SIZE,
        )
        terms += (
            Term(
                "judge_params",
                f"judge parameters ({judge.param_dtype}, frozen)",
                shard_bytes(judge),
                "both",
                "set reward.dtype=bfloat16 or " + weights_remedy,
            ),
            _kv_term(
                "judge_kv_cache",
                "judging",
                judge_concurrency.pool_pages,
                _phase_kv_bytes(judge_concurrency, j_token),
                f"{judge_rows} x {T_j} tokens",
                "set reward.batch_size (judge prompts decoding at once) or lower reward.max_new_tokens, or use more "
                "devices (the cache splits its sequences over mesh.data*fsdp)",
                "lower reward.kv_pool_gb (fewer judge traces decode at once), or use more devices",
            ),
        )
        concurrency += (judge_concurrency,)
    return MemoryPlan(model, (data, fsdp, tp), terms, b, rollout_rows, T, concurrency)


def _concurrency(
    phase: str, rows: int, prompt: int, cap: int, mean_new: int, samples: int, kv_token: int, pool_gb, page: int
) -> Concurrency:
    """Without a pool (pool_gb None) every row holds a cap-sized slot; with one, a prompt's `samples` rows
    share its full prompt pages and each holds its partly filled last prompt page and the pages of its
    mean_new tokens, and whole prompts are admitted (all their samples at once), as the engine does."""
    T = prompt + cap
    if pool_gb is None:
        return Concurrency(phase, rows, rows, rows, prompt, cap, mean_new, samples, None, page)
    pages = int(pool_gb * GB) // (page * kv_token)
    need = pool_floor(T, page)  # the engine refuses a pool without room for one trace at its cap
    if pages < need:
        key = "rollout.kv_pool_gb" if phase == "rollout" else "reward.kv_pool_gb"
        raise UserError(
            f"{key}={pool_gb} makes {pages} pages of {page} positions per device, fewer than the {need} one "
            f"{phase} trace at its cap of {T} positions needs; raise it"
        )
    group = prompt // page + samples * -(-(prompt % page + mean_new) // page)
    at_once = min(rows, samples * ((pages - 1) // group))  # one page is the null page
    cap_slots = int(pool_gb * GB) // (T * kv_token)
    return Concurrency(phase, rows, at_once, cap_slots, prompt, cap, mean_new, samples, pages, page)


def _phase_kv_bytes(cc: Concurrency, kv_token: int) -> float:
    if cc.pool_pages is None:
        return cc.sequences * (cc.prompt_tokens + cc.new_tokens_cap) * kv_token
    return cc.pool_pages * cc.page_size * kv_token


def _kv_term(key, phase, pool_pages, nbytes, contiguous_shape, contiguous_remedy, pool_remedy) -> Term:
    name = "rollout" if phase == "rollout" else "judge"
    if pool_pages is None:
        return Term(key, f"{name} KV cache ({contiguous_shape})", nbytes, phase, contiguous_remedy)
    return Term(key, f"{name} KV page pool ({pool_pages} pages)", nbytes, phase, pool_remedy)


def _judge_rows(strategy: str, prompts: int, G: int) -> int:
    """Comparisons in a step's first (largest) judging round."""
    if strategy in ("round_robin", "elo"):
        return prompts * G * (G - 1) // 2
    if strategy == "knockout":
        slots = next_power_of_two(G)
        return prompts * (G - (slots - G)) // 2
    return prompts * G  # circular, reference


def _shard_count(spec, mesh) -> int:
    axes = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(mesh.shape[a] for a in axes)


def check_fits(plan: MemoryPlan, device_memory: float, where: str) -> None:
    """UserError naming the largest term and what to change when the peak exceeds device_memory (bytes)."""
    if plan.peak > device_memory:
        big = plan.largest
        raise UserError(
            f"{where} does not fit: {plan.peak / GB:.1f} GB per device in the {plan.peak_phase} phase "
            f"> {device_memory / GB:.1f} GB; largest term: {big.label} {big.bytes / GB:.1f} GB; {big.remedy}"
        )


def check_devices(c: TrainConfig, devices: int) -> None:
    slots = c.mesh.data * c.mesh.fsdp * c.mesh.tp
    if slots != devices:
        raise UserError(
            f"mesh data={c.mesh.data} fsdp={c.mesh.fsdp} tp={c.mesh.tp} has {slots} slots but there are "
            f"{devices} devices; the product of data*fsdp*tp must equal {devices}"
        )


def check_training_fits(c: TrainConfig, model: Qwen2Config, where: str) -> MemoryPlan:
    """The check `rrm-jax train` runs before it starts, on the devices it runs on (skipped where the
    backend does not report a memory limit, e.g. CPU)."""
    import jax

    plan = plan_memory(c, model, judge_shape(c))
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit:
        check_fits(plan, limit, where)
    return plan


def format_plan(plan: MemoryPlan, device_memory: float | None, title: str) -> str:
    data, fsdp, tp = plan.mesh
    lines = [
        title,
        f"model: {plan.model.num_params / 1e9:.2f}B parameters, {plan.model.num_layers} layers; "
        f"mesh data={data} fsdp={fsdp} tp={tp} ({data * fsdp * tp} devices)",
        f"{'per device':<58}{'GB':>9}",
    ]
    for phase in ("both",) + plan.phases:
        for t in plan.terms:
            if t.phase == phase and t.bytes:
                tag = "" if phase == "both" else f"  [{phase}]"
                lines.append(f"  {t.label + tag:<56}{t.bytes / GB:>9.2f}")
    for phase in plan.phases:
        lines.append(f"  {phase + ' phase total':<56}{plan.phase_total(phase) / GB:>9.2f}")
    for cc in plan.concurrency:
        lines.append(_concurrency_line(cc))
    if device_memory is None:
        lines.append(f"peak {plan.peak / GB:.2f} GB ({plan.peak_phase}); pass --device-memory GB to check the fit")
    else:
        lines.append(
            f"peak {plan.peak / GB:.2f} GB ({plan.peak_phase}) of {device_memory / GB:.2f} GB per device: "
            f"{'fits' if plan.peak <= device_memory else 'does NOT fit'} "
            f"({100 * plan.peak / device_memory:.0f}% used)"
        )
    return "\n".join(lines)


def _concurrency_line(cc: Concurrency) -> str:
    trace = f"traces of {cc.prompt_tokens} prompt + {cc.mean_new_tokens} new tokens on average"
    if cc.pool_pages is None:
        return (
            f"{cc.phase}: all {cc.sequences} sequences per batch shard at once, each in a cap-sized slot of "
            f"{cc.prompt_tokens + cc.new_tokens_cap} positions (a page pool, {cc.phase.replace('judging', 'reward')}"
            f".kv_pool_gb, holds more in the same memory: {trace} share prompt pages)"
        )
    return (
        f"{cc.phase}: {cc.at_once} of {cc.sequences} sequences per batch shard decode at once in the pool "
        f"({cc.pool_pages} pages of {cc.page_size}; {trace}, a prompt's {cc.samples} samples sharing its prompt "
        f"pages); cap-sized slots in the same memory: {cc.cap_slots}"
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="training YAML (default: the embedded toy task)")
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="number of devices (default: the mesh's data*fsdp*tp, which must equal it; with a -1 "
        "mesh size, this machine's device count)",
    )
    parser.add_argument(
        "--device-memory",
        type=float,
        default=None,
        metavar="GB",
        help="memory per device in GB (1e9 bytes), e.g. 95 for TPU v5p, 80 for H100 (default: none, the plan is printed without a fit check)",
    )
    parser.add_argument(
        "--mean-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="mean new tokens of a rollout trace, for the traces-at-once line (default: a fifth of "
        "rollout.max_new_tokens)",
    )
    parser.add_argument(
        "--judge-mean-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="the same for the judge's traces (default: a fifth of its max_new_tokens)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for rrm-jax train")
    parser.set_defaults(run=run_plan)


def run_plan(args) -> int:
    c = load_config(args.config, args.overrides)
    if -1 in (c.mesh.data, c.mesh.fsdp, c.mesh.tp):  # "all remaining devices": of --devices, else of this machine
        import jax

        c = c.with_mesh_for(args.devices if args.devices is not None else jax.device_count())
    if args.devices is not None:
        check_devices(c, args.devices)
    if args.device_memory is not None and args.device_memory <= 0:
        raise UserError(f"--device-memory {args.device_memory} must be a positive number of GB")
    where = args.config or "the embedded default config"
    for flag, value in (
        ("--mean-new-tokens", args.mean_new_tokens),
        ("--judge-mean-new-tokens", args.judge_mean_new_tokens),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be >= 1")
    plan = plan_memory(
        c,
        model_shape(c),
        judge_shape(c),
        mean_new_tokens=args.mean_new_tokens,
        judge_mean_new_tokens=args.judge_mean_new_tokens,
    )
    memory = args.device_memory * GB if args.device_memory is not None else None
    print(format_plan(plan, memory, f"memory plan of {where}"))
    if memory is not None:
        check_fits(plan, memory, where)
    return 0
