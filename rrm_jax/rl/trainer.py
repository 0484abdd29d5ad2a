"""`rrm-jax train`: GRPO training, from a laptop CPU to a pod, exactly resumable.

Two kinds of run share this loop; their task (the `Task` protocol, rrm_jax/rl/task.py) says what
differs (prompts, rewards, evaluation, warm-up data, held-out file, summary, curve):
  - judge training (`reward: rrm`, rrm_jax/rl/judge_task.py): an RRM on preference pairs, rewarded
    for verdicts that pick the preferred response;
  - policy training (`reward: {type: judge}`, rrm_jax/rl/policy.py): a policy on prompts, rewarded by
    a frozen RRM comparing each group's samples on the same mesh.

One run, in OUTPUT_DIR:

    config.yaml        the resolved config (the base of `--resume`, which may change only the keys of
                       rrm_jax.rl.config.RESUME_MAY_CHANGE)
    heldout.jsonl      the held-out items: pairs `{prompt, chosen, rejected}` (`rrm-jax eval --format
                       pairs`), or a policy's held-out prompts `{prompt, reference?}`
    checkpoints/<step>/  Orbax CheckpointManager steps (rrm_jax/rl/checkpoints.py): params + model_config
                       (an rrm-jax checkpoint, so `rrm_jax.load_model(OUTPUT_DIR)` and every command
                       accept OUTPUT_DIR), assets/ (tokenizer), opt_state, ref_params (only with a KL
                       term), train_state (step, seed, data-iterator position, elapsed time), config
    metrics.jsonl      one JSON object per step, and tb/ TensorBoard events (rrm_jax/rl/metrics.py)
    curve.png          written at the end (rrm_jax/rl/plot.py)

OUTPUT_DIR may be a gs:// bucket path: nothing in it is then finished by renaming a folder
(rrm_jax/storage.py).

`train` runs four stages: `setup` (every check that can fail, before OUTPUT_DIR is touched), the
starting state (`_initial_state`: phase A for a new run, the latest checkpoint for a resumed one), the
GRPO loop (`GrpoLoop`, phase B) and `finish` (curve, export, summary).

Phase A, an optional supervised format warm-up on toy transcripts (the judge: RANDOM verdicts, so it
learns to answer, not what to answer; the policy: letter strings, 3 in 4 of them with the banned
letter). Phase B, GRPO, one step as named stages: `rollout` (B prompts -> G samples each), `score`
(the task's rewards, group advantages, the guard's penalties, rollout statistics), `update`
(`ppo_epochs` clipped-policy updates -> AdamW); then the loop logs metrics, lets the guard
(rrm_jax/rl/guard.py) look for a collapse (stop, or roll back to the last good checkpoint), evaluates,
checkpoints, and on SIGTERM / Ctrl-C saves the step it finished and exits. The sampler and the update
share one copy of the weights: the updated arrays are put back into the model the sampler reads.

All randomness is a function of (seed, step) and the data iterator's position, both in the
checkpoint, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rrm_jax import checkpoint, distributed, generate, parallel, plan, resumable, storage
from rrm_jax.data.char_tokenizer import BOXED_OPEN, verdict_token_ids
from rrm_jax.errors import UserError
from rrm_jax.model import convert
from rrm_jax.model.config import PRESETS, Qwen2Config
from rrm_jax.model.qwen2 import Qwen2
from rrm_jax.rl import grpo, guard, policy, step
from rrm_jax.rl.checkpoints import CHECKPOINTS, Checkpoints
from rrm_jax.rl.config import JUDGE_REWARD, RESUME_MAY_CHANGE, TrainConfig, load_config, resume_conflicts
from rrm_jax.rl.judge_task import JudgeTask
from rrm_jax.rl.metrics import (
    METRICS,
    TIMING_KEYS,  # noqa: F401 (part of this module's API)
    MetricsLog,
    current_attempt,
    read_metrics,
)
from rrm_jax.rl.plot import plot_curve
from rrm_jax.rl.task import Task
from rrm_jax.rl.tokenizer import TOY_TOKENIZER, load_train_tokenizer, token_ids_of  # noqa: F401 (part of this module's API)

RUN_CONFIG = "config.yaml"
HELDOUT = "heldout.jsonl"
EXIT_COLLAPSE = 3  # the guard stopped a collapsed run


# ----------------------------------------------------------------------------------------------
# Set-up: mesh, tokenizer, model, task, optimizer, the run folder


def build_model(c: TrainConfig, tokenizer, mesh) -> Qwen2:
    m = c.model
    if m.init is None or m.init in PRESETS:
        if m.init is None:
            config = m.shape(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        else:
            config = PRESETS[m.init].replace(param_dtype=m.param_dtype, dtype=m.dtype)
        model = Qwen2(config, rngs=nnx.Rngs(c.seed), init=m.initializer)
        return parallel.shard_model(model, mesh) if mesh is not None else model
    if not Path(m.init).exists():
        raise UserError(
            f"model.init={m.init!r} is neither a preset ({', '.join(PRESETS)}) nor an existing model folder"
        )
    return checkpoint.load_model(m.init, dtype=m.param_dtype, compute_dtype=m.dtype, mesh=mesh)[0]


def make_mesh(c: TrainConfig):
    """None (one device, no sharding) for a 1x1x1 mesh in a single process, else the mesh over all
    devices of all processes (several processes always train as one mesh); a -1 size fills the devices."""
    m = c.with_mesh_for(jax.device_count()).mesh
    if m.data * m.fsdp * m.tp == 1 and jax.process_count() == 1:
        return None
    return parallel.make_mesh(m.data, m.fsdp, m.tp)


def adamw(lr, *, b1: float, b2: float, weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))


def grpo_optimizer(c: TrainConfig) -> optax.GradientTransformation:
    o = c.optimizer
    schedule = optax.linear_schedule(0.0, o.lr, o.warmup_steps) if o.warmup_steps else o.lr  # then constant
    return adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, grad_clip=o.grad_clip)


def _continues_a_run(output_dir: Path, resume: bool) -> bool:
    """--resume of a run that has a checkpoint to continue from (without one, --resume starts over)."""
    return resume and checkpoint.latest_step(output_dir / CHECKPOINTS) is not None


def check_resume(output_dir: Path, c: TrainConfig, resume: bool) -> None:
    """Refuse a --resume whose config changes what the saved run is (the keys outside RESUME_MAY_CHANGE),
    naming each changed key with its saved and given values, or whose metrics.jsonl is damaged."""
    saved_path = output_dir / RUN_CONFIG
    if not _continues_a_run(output_dir, resume):
        return
    read_metrics(output_dir / METRICS)  # a damaged line stops the resume before anything is loaded or written
    if not saved_path.exists():
        return
    conflicts = resume_conflicts(load_config(base=yaml.safe_load(saved_path.read_text())), c)
    if not conflicts:
        return
    shown = 4
    changes = "; ".join(f"{key}: {saved!r} saved, {given!r} given" for key, saved, given in conflicts[:shown])
    if len(conflicts) > shown:
        changes += f"; and {len(conflicts) - shown} more ({', '.join(key for key, _, _ in conflicts[shown:])})"
    raise UserError(
        f"--resume of {output_dir} would change what the run is ({changes}); --resume may change only "
        f"{', '.join(RESUME_MAY_CHANGE)}; for another run choose another --output-dir"
    )


def _prepare_output(output_dir: Path, resume: bool, c: TrainConfig, task: Task) -> None:
    """Check OUTPUT_DIR on every process, then let process 0 create it and write the run config and
    the task's held-out items (kept as they are when a resume continues the run: its evaluations used them)."""
    previous = (output_dir / METRICS).exists() or (output_dir / CHECKPOINTS).exists()
    if previous and not resume:
        raise UserError(
            f"{output_dir} already holds a training run; pass --resume to continue it or choose another --output-dir"
        )
    keep_heldout = _continues_a_run(output_dir, resume) and (output_dir / HELDOUT).exists()
    distributed.barrier("output-dir-checked")  # before process 0 writes anything the others would see
    if distributed.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        # whole or not at all: a config.yaml cut short would fill its missing sections with defaults on --resume
        storage.write_text(output_dir / RUN_CONFIG, yaml.safe_dump(c.to_dict(), sort_keys=False))
        if not keep_heldout:
            task.write_heldout(output_dir / HELDOUT)
    distributed.barrier("output-dir-ready")


def resolve_config(config_path: str | None, overrides: list[str], output_dir: Path, resume: bool) -> TrainConfig:
    saved = output_dir / RUN_CONFIG
    if resume and config_path is None and saved.exists():
        return load_config(overrides=overrides, base=yaml.safe_load(saved.read_text()))
    return load_config(config_path, overrides)


@dataclasses.dataclass
class Run:
    """What stays fixed through a run, built once by `setup`."""

    config: TrainConfig
    output_dir: Path
    mesh: object
    tokenizer: object
    task: Task  # what differs between judge and policy training (rrm_jax/rl/task.py)
    model: Qwen2
    optimizer: optax.GradientTransformation
    loss: step.LossSettings
    verdict_open_id: int | None
    main: bool
    progress: bool

    @property
    def model_config(self) -> Qwen2Config:
        return self.model.config


@dataclasses.dataclass
class State:
    """What a checkpoint restores (besides the weights, which live in `run.model`)."""

    step: int
    params: dict
    opt_state: object
    ref_params: dict | None
    rollout_seed: int  # the sampler's seed stream; a rollback draws a new one
    rollbacks: int = 0


def setup(c: TrainConfig, output_dir: Path, *, resume: bool, progress: bool) -> Run:
    """Mesh, tokenizer, data and model; every check that can fail runs before OUTPUT_DIR is touched."""
    check_resume(output_dir, c, resume)  # first: a refused resume builds nothing
    mesh = make_mesh(c)
    tokenizer = load_train_tokenizer(c.tokenizer)
    model = build_model(c, tokenizer, mesh)
    allowed_ids = token_ids_of(tokenizer, c.rollout.allowed_tokens, "rollout.allowed_tokens")
    if c.reward.type == JUDGE_REWARD:
        task = policy.PolicyTask(
            c, tokenizer, mesh, model.config, allowed_ids
        )  # loads the frozen judge onto the same mesh
    else:
        task = JudgeTask(c, tokenizer)
    mcfg = model.config
    plan.check_training_fits(
        c.with_mesh_for(jax.device_count()), mcfg, "this training config"
    )  # the `rrm-jax plan` check, on these devices
    if c.data.max_prompt_len + c.rollout.max_new_tokens > mcfg.max_position_embeddings:
        raise UserError(
            f"data.max_prompt_len + rollout.max_new_tokens = {c.data.max_prompt_len + c.rollout.max_new_tokens} "
            f"exceeds the model's context of {mcfg.max_position_embeddings} tokens"
        )
    loss, verdict_open_id = _loss_settings(c, tokenizer, allowed_ids)
    grpo.aggregation_count(np.ones((1, 1)), c.loss.agg)  # unknown names fail now, not after the warm-up
    grpo.kl_penalty(jnp.zeros(1), jnp.zeros(1), c.loss.kl_estimator)
    _prepare_output(output_dir, resume, c, task)
    main = distributed.is_main_process()
    return Run(
        c, output_dir, mesh, tokenizer, task, model, grpo_optimizer(c), loss, verdict_open_id, main, progress and main
    )


def _loss_settings(c: TrainConfig, tokenizer, allowed_ids: tuple[int, ...]) -> tuple[step.LossSettings, int | None]:
    """(the loss's settings, the id of `\\boxed{`): with loss.entropy_on=verdict the entropy bonus is on
    the verdict token after `\\boxed{`, over the verdict tokens only; otherwise on every generated token."""
    verdict_open_id, entropy_ids = None, ()
    if c.loss.entropy_coef > 0 and c.loss.entropy_on == "verdict":
        try:
            entropy_ids = verdict_token_ids(tokenizer)
        except ValueError:
            raise UserError(
                "loss.entropy_on=verdict needs a tokenizer with single verdict tokens (the toy's); "
                "use loss.entropy_on=completion"
            ) from None
        verdict_open_id = tokenizer.convert_tokens_to_ids(BOXED_OPEN)
    loss = step.LossSettings.from_config(c.loss, entropy_token_ids=entropy_ids, allowed_token_ids=allowed_ids)
    return loss, verdict_open_id


# ----------------------------------------------------------------------------------------------
# Phase A: the supervised format warm-up


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def supervised_step(config: Qwen2Config, optimizer, params, opt_state, tokens, attention_mask, loss_mask):
    """One cross-entropy step on transcripts; loss_mask [B, T] marks the tokens to predict."""

    def loss_fn(p):
        logp = step.token_logprobs(config, p, tokens, attention_mask)
        return -jnp.sum(logp * loss_mask) / jnp.maximum(loss_mask.sum(), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _warmup(
    c: TrainConfig, mcfg: Qwen2Config, params, task: Task, tokenizer, progress: bool, stop: resumable.StopSignals
):
    """Phase A: supervised format warm-up on the task's transcripts (judge: random verdicts; policy:
    letter strings, 3 in 4 of them carrying the banned letter). None when a stop signal ended it."""
    w = c.warmup
    if not w.steps:
        return params
    optimizer = adamw(w.lr, b1=0.9, b2=w.b2, weight_decay=0.0, grad_clip=w.grad_clip)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng([c.seed, 2])
    params = jax.tree.map(jnp.copy, params)  # the step donates its inputs; keep the model's arrays intact
    bar = _progress_bar(1, w.steps, progress, desc="format warm-up")
    for _ in range(w.steps):
        if distributed.any_process(stop.requested()):
            bar.close()
            return None
        batch = task.warmup_batch(w.batch_size, rng)
        attention = (batch["tokens"] != tokenizer.pad_token_id).astype(np.int32)
        params, opt_state, loss_value = supervised_step(
            mcfg, optimizer, params, opt_state, batch["tokens"], attention, batch["loss_mask"]
        )
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss_value):.3f}", refresh=False)
    bar.close()
    return params


# ----------------------------------------------------------------------------------------------
# Phase B, one GRPO step as stages: rollout -> score (the task) -> update


def rollout(run: Run, state: State, prompts: list[list[int]]):
    """G samples per prompt from the current weights, prompt-major."""
    r = run.config.rollout
    return generate.sample(
        run.model,
        prompts,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        num_samples=r.samples_per_prompt,
        seed=_step_seed(state.rollout_seed, state.step),
        eos_ids=None if r.stop_at_eos else [],
        tokenizer=run.tokenizer,
        allowed_token_ids=run.loss.allowed_token_ids,
        kv_pool_gb=r.kv_pool_gb,
    )


def rollout_arrays(prompts: list[list[int]], samples, width: int, *, verdict_open_id: int | None):
    """Numpy arrays of a RolloutBatch (without advantages / reference) from prompt-major samples:
    (prompt_tokens, prompt_lengths, tokens, loss_mask, old_logp, entropy_mask).

    Prompts are right-padded to a multiple of 4 tokens and continuations to `width` (max_new_tokens),
    so the update compiles for few shapes. The entropy mask is the verdict position (the token after
    `\\boxed{`) when verdict_open_id is given, else every generated token."""
    P, R = len(prompts), len(samples)
    prompt_tokens = np.zeros((P, 4 * math.ceil(max(map(len, prompts)) / 4)), np.int32)
    for i, p in enumerate(prompts):
        prompt_tokens[i, : len(p)] = p
    prompt_lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((R, width), np.int32)
    loss_mask = np.zeros((R, width), np.float32)
    old_logp = np.zeros((R, width), np.float32)
    for r, s in enumerate(samples):
        n = len(s.output_ids)
        tokens[r, :n] = s.output_ids
        loss_mask[r, :n] = 1.0
        old_logp[r, :n] = s.logprobs
    if verdict_open_id is None:
        entropy_mask = loss_mask.copy()
    else:
        after_open = np.zeros_like(loss_mask)
        after_open[:, 1:] = tokens[:, :-1] == verdict_open_id
        entropy_mask = loss_mask * after_open
    return prompt_tokens, prompt_lengths, tokens, loss_mask, old_logp, entropy_mask


def _device_batch(arrays, mesh):
    """Batch-shard each array over (data, fsdp) on its leading axis."""
    if mesh is None:
        return arrays
    return tuple(
        jax.device_put(a, parallel.logical_sharding(("batch",) + ("length",) * (a.ndim - 1), mesh)) for a in arrays
    )


def update(run: Run, state: State, prompts, samples, advantages) -> dict:
    """`ppo_epochs` clipped-policy updates on one rollout; the model the sampler reads gets the new weights."""
    arrays = (
        *rollout_arrays(prompts, samples, run.config.rollout.max_new_tokens, verdict_open_id=run.verdict_open_id),
        advantages,
    )
    prompt_tokens, prompt_lengths, tokens, loss_mask, old_logp, entropy_mask, advantages = _device_batch(
        arrays, run.mesh
    )
    ref_logp = (
        step.logprobs_fn(
            run.model_config,
            state.ref_params,
            prompt_tokens,
            prompt_lengths,
            tokens,
            allowed_token_ids=run.loss.allowed_token_ids,
        )
        if state.ref_params is not None
        else jnp.zeros_like(old_logp)
    )
    batch = step.RolloutBatch(
        prompt_tokens, prompt_lengths, tokens, loss_mask, old_logp, ref_logp, advantages, entropy_mask
    )
    for _ in range(run.config.loss.ppo_epochs):
        state.params, state.opt_state, metrics = step.update_fn(
            run.model_config,
            run.loss,
            run.optimizer,
            run.config.loss.micro_batches,
            state.params,
            state.opt_state,
            batch,
        )
    nnx.update(run.model, state.params)  # the sampler reads the new weights; no second copy
    return {k: float(v) for k, v in distributed.gather_to_host(metrics).items()}


def grpo_step(run: Run, state: State) -> dict:
    """One GRPO step (state.step is the step being taken) -> its metrics row (without eval / elapsed)."""
    t0 = time.perf_counter()
    prompts, context = run.task.next_batch()
    samples = rollout(run, state, prompts)
    t_rollout = time.perf_counter() - t0
    advantages, stats = run.task.score(samples, context, seed=_step_seed(state.rollout_seed, state.step))
    t_update = time.perf_counter()
    update_metrics = update(run, state, prompts, samples, advantages)
    step_time = time.perf_counter() - t0
    tokens = stats.pop("tokens_generated")
    return {
        "step": state.step,
        **stats,
        **update_metrics,
        "tokens_per_s": float(tokens / step_time),
        "rollout_time": t_rollout,
        "update_time": time.perf_counter() - t_update,
        "step_time": step_time,
    }


def _step_seed(seed: int, step_number: int) -> int:
    return int(np.random.SeedSequence([seed, step_number]).generate_state(1)[0] & 0x7FFFFFFF)


# ----------------------------------------------------------------------------------------------
# The run: its starting state (the warm-up's model or a checkpoint), the GRPO loop, the finish


def _on_mesh(tree, mesh):
    """Leaves not laid out on the mesh yet (the optimizer's step count) replicated over it, so that
    restoring a checkpoint into this tree does not pin them to one device."""
    if mesh is None:
        return tree
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        on_mesh = isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        return x if on_mesh else jax.device_put(x, replicated)

    return jax.tree.map(place, tree)


def _restore(run: Run, ckpts: Checkpoints, step_number: int, state: State) -> dict:
    """Load checkpoint step_number into state and the model; returns its train_state."""
    restored = ckpts.restore(step_number, state.params, state.opt_state, state.ref_params)
    state.params, state.opt_state = restored["params"], restored["opt_state"]
    if state.ref_params is not None:
        state.ref_params = restored["ref_params"]
    nnx.update(run.model, state.params)
    saved = restored["train_state"]
    run.task.batches.set_state(saved["data_iterator"])
    state.step = step_number
    state.rollout_seed = saved.get("rollout_seed", saved["seed"])
    state.rollbacks = saved.get("rollbacks", 0)
    return saved


def _initial_state(
    run: Run, ckpts: Checkpoints, start: int | None, stop: resumable.StopSignals
) -> tuple[State | None, float]:
    """(state, elapsed before this process started): the warm-up's result for a new run, the latest
    checkpoint for a resumed one; None when a stop signal arrived during the warm-up."""
    c = run.config
    params = run.model.params()
    if start is None:
        params = _warmup(c, run.model_config, params, run.task, run.tokenizer, run.progress, stop)
        if params is None:  # every process agreed to stop
            return None, 0.0
        nnx.update(run.model, params)
        params = run.model.params()
    opt_state = _on_mesh(run.optimizer.init(params), run.mesh)  # on resume, the restore target: arrays keep its layout
    ref_params = jax.tree.map(jnp.copy, params) if c.loss.kl_coef > 0 else None  # frozen: the policy GRPO starts from
    state = State(start or 0, params, opt_state, ref_params, rollout_seed=c.seed)
    if start is None:
        return state, 0.0
    saved = _restore(run, ckpts, start, state)
    if run.main:
        print(f"resuming {run.output_dir} from step {start}", file=sys.stderr)
        if start >= c.max_steps:
            print(
                f"{run.output_dir} is already trained to step {start} (max_steps={c.max_steps}); its summary follows. "
                f"For a new run: rm -rf {run.output_dir}, or --output-dir elsewhere; for more steps: --resume "
                f"max_steps=N",
                file=sys.stderr,
            )
    return state, saved["elapsed"]


def _new_rollout_seed(seed: int, rollbacks: int) -> int:
    return int(np.random.SeedSequence([seed, 1 << 20, rollbacks]).generate_state(1)[0] & 0x7FFFFFFF)


def train(
    c: TrainConfig, output_dir: Path, *, resume: bool = False, export_hf: str | None = None, progress: bool = True
) -> int:
    """The whole run; returns the exit code (0; EXIT_COLLAPSE when the guard stopped it; after SIGTERM or
    Ctrl-C, which save the step in flight, 0 or EXIT_CTRL_C: resumable.StopSignals)."""
    t_start = time.perf_counter()
    output_dir = storage.as_path(output_dir)  # a gs:// string stays a bucket path
    run = setup(c, output_dir, resume=resume, progress=progress)
    ckpts = Checkpoints(output_dir, c.keep_checkpoints)
    start = ckpts.latest_step() if resume else None
    stop = resumable.StopSignals()  # SIGTERM (a preemption) and Ctrl-C: save the step in flight, then exit
    state, elapsed_before = _initial_state(run, ckpts, start, stop)
    if state is None:
        return _stopped_during_warmup(run, ckpts, stop)
    metrics = MetricsLog(output_dir, start if start is not None else (-1 if resume else None))
    ending = GrpoLoop(run, state, ckpts, metrics, stop, start=start, clock0=t_start - elapsed_before).execute()
    if not ending.preempted:
        finish(run, ckpts, ending, export_hf)
    return ending.exit_code


def _stopped_during_warmup(run: Run, ckpts: Checkpoints, stop: resumable.StopSignals) -> int:
    stop.restore()
    ckpts.close()
    if run.main:
        print(f"\n{stop.name} during the format warm-up: nothing to save yet; --resume starts over", file=sys.stderr)
    return stop.exit_code


@dataclasses.dataclass(frozen=True)
class Ending:
    """How the GRPO loop ended."""

    exit_code: int
    preempted: bool  # a stop signal ended it: the step in flight is saved for --resume, nothing is summed up
    rows: list[dict]  # metrics.jsonl as it stands (process 0; [] on the others)


class GrpoLoop:
    """Phase B: GRPO steps until max_steps, a collapse or a stop signal. Each step's metrics row is
    logged (with the held-out evaluation every eval_every steps), the guard watches it for a collapse
    (stop, or roll back to the last good checkpoint) and a checkpoint is written when one is due."""

    def __init__(
        self,
        run: Run,
        state: State,
        ckpts: Checkpoints,
        metrics: MetricsLog,
        stop: resumable.StopSignals,
        *,
        start: int | None,
        clock0: float,
    ):
        self.run, self.state, self.ckpts, self.metrics, self.stop = run, state, ckpts, metrics, stop
        self.start = start  # the restored step; None for a new run
        self.clock0 = clock0  # perf_counter() at the run's start: elapsed time counts across resumes
        g = run.config.guard
        self.detector = guard.CollapseDetector(g.collapse_steps, g.collapse_threshold)
        self.truncation = guard.TruncationWatch(g.truncation_warning, run.config.rollout.max_new_tokens)
        self.last_saved, self.save_due = start, False
        self.shown_eval: dict = {}  # the latest evaluation's figures: on every frame of the bar until the next one
        self.bar = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.clock0

    def save(self) -> Path:
        run, state = self.run, self.state
        train_state = {
            "step": state.step,
            "seed": run.config.seed,
            "rollout_seed": state.rollout_seed,
            "rollbacks": state.rollbacks,
            "data_iterator": run.task.batches.get_state(),
            "elapsed": self.elapsed(),
        }
        return self.ckpts.save(
            state.step, run.model, state.opt_state, state.ref_params, train_state, run.config, run.tokenizer
        )

    def execute(self) -> Ending:
        """The loop; the signal handlers, the metrics log and the checkpoint manager are released
        however it ends."""
        try:
            self._begin()
            self.bar = _progress_bar(self.state.step + 1, self.run.config.max_steps, self.run.progress)
            with self.bar:
                exit_code, preempted = self._steps()
        finally:
            self.stop.restore()
            rows = self.metrics.rows()
            self.metrics.close()
            self.ckpts.close()
        return Ending(exit_code, preempted, rows)

    def _begin(self) -> None:
        """A new run's step-0 evaluation and, when a rollback may need it (or there are no steps), the
        warm-up's checkpoint; the bar starts with the latest evaluation's figures."""
        run, c = self.run, self.run.config
        if self.start is None and c.eval_every:
            self.metrics.log({"step": 0, **run.task.evaluate(run.model), "elapsed": self.elapsed()})
        self.shown_eval = next((e for e in map(run.task.eval_progress, reversed(self.metrics.rows())) if e), {})
        if self.start is None and (c.guard.on_collapse == "rollback" or c.max_steps == 0):
            self.save()  # the warm-up's model: a rollback target before the first periodic checkpoint

    def _steps(self) -> tuple[int, bool]:
        """(exit code, preempted) once the steps up to max_steps are taken or something stopped them."""
        c, state = self.run.config, self.state
        while state.step < c.max_steps:
            state.step += 1
            collapse = self._take_step()
            if distributed.any_process(self.stop.requested()):  # every process stops at the same step
                self._save_for_resume()
                return self.stop.exit_code, True
            if collapse is not None:
                if not self._may_roll_back():
                    return self._stop_on_collapse(collapse), False
                self._roll_back(collapse)
                continue
            self._checkpoint_if_due()
        if self.last_saved != c.max_steps and c.max_steps > (self.start or 0):
            self.save()
        return 0, False

    def _take_step(self) -> guard.Collapse | None:
        """One GRPO step, its row logged and shown; the collapse the guard sees in it, if any."""
        run, state, c = self.run, self.state, self.run.config
        row = grpo_step(run, state)
        collapse = self.detector.observe(state.step, row)
        streak_start = self.detector.streak_start
        row["collapse_streak"] = 0 if streak_start is None else state.step - streak_start + 1
        if c.eval_every and state.step % c.eval_every == 0:
            row.update(run.task.evaluate(run.model))
        row["elapsed"] = self.elapsed()
        self.metrics.log(row)
        self._show(row)
        return collapse

    def _show(self, row: dict) -> None:
        """The step on the progress bar, and the guard's truncation warning when it has one."""
        task = self.run.task
        self.shown_eval.update(task.eval_progress(row))
        self.bar.set_postfix({**task.step_progress(row), **self.shown_eval}, refresh=False)  # drawn by the update
        self.bar.update(1)
        warning = self.truncation.observe(self.state.step, row["truncated_fraction"])
        if warning and self.run.main:
            self.bar.write(warning, file=sys.stderr)

    def _checkpoint_if_due(self) -> None:
        # A checkpoint is only written at a step without a collapse signal, so the latest one is
        # always good: a due save waits for the next healthy step.
        c, step_number = self.run.config, self.state.step
        self.save_due = self.save_due or bool(c.checkpoint_every and step_number % c.checkpoint_every == 0)
        if self.save_due and self.detector.streak_start is None:
            self.save()
            self.last_saved, self.save_due = step_number, False

    def _save_for_resume(self) -> None:
        step_dir = self.save()
        if self.run.main:
            print(
                f"\n{self.stop.name}: saved step {self.state.step} to {step_dir}; resume with --resume", file=sys.stderr
            )

    def _may_roll_back(self) -> bool:
        g = self.run.config.guard
        return (
            g.on_collapse == "rollback"
            and self.state.rollbacks < g.max_rollbacks
            and self.ckpts.latest_step() is not None
        )

    def _roll_back(self, collapse: guard.Collapse) -> None:
        """Restore the latest (good) checkpoint and go on from it with a new rollout seed."""
        run, state, ckpts = self.run, self.state, self.ckpts
        good = ckpts.latest_step()
        rollbacks = state.rollbacks + 1
        _restore(run, ckpts, good, state)
        state.rollbacks = rollbacks
        state.rollout_seed = _new_rollout_seed(run.config.seed, rollbacks)
        self.metrics.log(
            {
                "step": collapse.step,
                "collapse": collapse.signal,
                "collapse_since": collapse.since,
                "action": "rollback",
                "rolled_back_to": good,
                "rollbacks": rollbacks,
                "rollout_seed": state.rollout_seed,
            }
        )
        if run.main:
            self.bar.write(
                f"{collapse.describe()}; rolled back to checkpoint step {good} ({ckpts.root / str(good)}) "
                f"with a new rollout seed (rollback {rollbacks} of at most {run.config.guard.max_rollbacks})",
                file=sys.stderr,
            )
        self.detector.reset()
        self.bar.reset(total=max(run.config.max_steps - state.step, 0))
        self.save_due = False

    def _stop_on_collapse(self, collapse: guard.Collapse) -> int:
        run, state, ckpts = self.run, self.state, self.ckpts
        good = ckpts.latest_step()
        self.metrics.log(
            {
                "step": collapse.step,
                "collapse": collapse.signal,
                "collapse_since": collapse.since,
                "action": "stop",
                "last_good_checkpoint": good,
                "rollbacks": state.rollbacks,
            }
        )
        if run.main:
            where = (
                f"last good checkpoint: {ckpts.root / str(good)} (step {good})"
                if good is not None
                else f"no checkpoint was saved before it (checkpoint_every={run.config.checkpoint_every})"
            )
            after = f" after {state.rollbacks} rollback(s)" if state.rollbacks else ""
            print(
                f"\nrrm-jax train: stopped{after}: {collapse.describe()}; {where}; metrics: "
                f"{run.output_dir / METRICS}. guard.on_collapse=rollback retries from the last good checkpoint "
                f"with a new rollout seed",
                file=sys.stderr,
            )
        return EXIT_COLLAPSE


def finish(run: Run, ckpts: Checkpoints, ending: Ending, export_hf: str | None) -> None:
    """After a run that ended well: the curve, the Hugging Face export and the summary (process 0);
    then, however it ended short of a stop signal, every process waits for the others."""
    latest = ckpts.latest_step()
    step_dir = ckpts.root / str(latest) if latest is not None else None
    if run.main and ending.exit_code == 0:
        rows = current_attempt(ending.rows)
        plot_curve(rows, run.output_dir / "curve.png", run.task)
        if export_hf:  # from the files just written: no process holds all the weights of a sharded model
            convert.checkpoint_to_hf(step_dir, export_hf)
        context = run.model_config.max_position_embeddings
        for line in summary_lines(run.task, rows, run.output_dir, step_dir, cli_prefix(), context):
            print(line)
        if export_hf:
            print(f"Hugging Face export: {export_hf}")
    distributed.barrier("run-finished")


def summary_lines(task: Task, rows: list[dict], output_dir: Path, step_dir: Path, exe: str, context: int) -> list[str]:
    """What a finished run prints: the task's summary and follow-on commands, then the export command
    (the README shows these lines as `make demo` prints them; a test keeps the two equal)."""
    return [
        *task.summary(rows, output_dir, step_dir, exe, context),
        f"  {exe} convert orbax-to-hf --ckpt {output_dir} --out {output_dir}-hf",
    ]


def cli_prefix() -> str:
    """How to call `rrm-jax` from where the user stands: plain `rrm-jax` when that name on PATH is this
    installation, else the path of this installation's script (e.g. `.venv/bin/rrm-jax` after `make demo`)."""
    script = Path(sys.executable).parent / "rrm-jax"
    on_path = shutil.which("rrm-jax")
    if not script.exists() or (on_path and os.path.samefile(on_path, script)):
        return "rrm-jax"
    relative = os.path.relpath(script)
    return relative if not relative.startswith("..") else str(script.absolute())


def _progress_bar(first: int, last: int, enabled: bool, desc: str = "GRPO"):
    from tqdm import tqdm

    return tqdm(total=max(last - first + 1, 0), desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# CLI (the flags are in rrm_jax.rl.train_cli, which imports this module only to run)


def run_train(args) -> int:
    for path in (args.output_dir, args.export_hf):
        storage.check_support(path)
    output_dir = storage.as_path(args.output_dir)
    config = resolve_config(args.config, args.overrides, output_dir, args.resume)
    if args.export_hf:
        checkpoint.check_output_free(args.export_hf)
    return train(config, output_dir, resume=args.resume, export_hf=args.export_hf, progress=not args.no_progress)
