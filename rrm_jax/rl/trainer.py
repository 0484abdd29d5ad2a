"""`rrm-jax train`: GRPO training, from a laptop CPU to a pod, exactly resumable.

Two kinds of run share this loop; their task says what differs (prompts, rewards, evaluation,
warm-up data, summary):
  - judge training (`reward: rrm`, rrm_jax/rl/judge_task.py): an RRM on preference pairs, rewarded
    for verdicts that pick the preferred response;
  - policy training (`reward: {type: judge}`, rrm_jax/rl/policy.py): a policy on prompts, rewarded by
    a frozen RRM comparing each group's samples on the same mesh.

One run, in OUTPUT_DIR:

    config.yaml        the resolved config (the base of `--resume`, which may change only the keys of
                       rrm_jax.rl.config.RESUME_MAY_CHANGE)
    heldout.jsonl      the held-out items: pairs `{prompt, chosen, rejected}` (`rrm-jax eval --format
                       pairs`), or a policy's held-out prompts `{prompt, reference?}`
    checkpoints/<step>/  Orbax CheckpointManager steps: params + model_config (an rrm-jax checkpoint, so
                       `rrm_jax.load_model(OUTPUT_DIR)` and every command accept OUTPUT_DIR), assets/
                       (tokenizer), opt_state, ref_params (only with a KL term), train_state (step,
                       seed, data-iterator position, elapsed time), config
    metrics.jsonl      one JSON object per step; tb/ TensorBoard events; curve.png at the end

OUTPUT_DIR may be a gs:// bucket path: nothing in it is then finished by renaming a folder
(rrm_jax/storage.py).

Phases: (A) an optional supervised format warm-up on toy transcripts (the judge: RANDOM verdicts, so
it learns to answer, not what to answer; the policy: letter strings, 3 in 4 of them with the banned
letter), then (B) GRPO, one step as named stages: `rollout` (B prompts -> G samples each), `score`
(the task's rewards, group advantages, the guard's penalties, rollout statistics), `update`
(`ppo_epochs` clipped-policy updates -> AdamW); then the loop logs metrics, lets the guard
(rrm_jax/rl/guard.py) look for a collapse (stop, or roll back to the last good checkpoint), evaluates
and checkpoints. The sampler and the update share one copy of the weights: the updated arrays are put
back into the model the sampler reads.

All randomness is a function of (seed, step) and the data iterator's position, both in the
checkpoint, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import io
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
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
from rrm_jax.rl.config import JUDGE_REWARD, RESUME_MAY_CHANGE, TrainConfig, load_config, resume_conflicts
from rrm_jax.rl.judge_task import JudgeTask
from rrm_jax.rl.tokenizer import TOY_TOKENIZER, load_train_tokenizer, token_ids_of  # noqa: F401 (part of this module's API)

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
HELDOUT = "heldout.jsonl"
EXIT_COLLAPSE = 3  # the guard stopped a collapsed run
TIMING_KEYS = ("step_time", "rollout_time", "judge_time", "update_time", "tokens_per_s", "elapsed")  # vary run to run


# ----------------------------------------------------------------------------------------------
# Set-up: tokenizer, model, data


def build_model(c: TrainConfig, tokenizer, mesh) -> Qwen2:
    m = c.model
    if m.init is None or m.init in PRESETS:
        if m.init is None:
            eos = tokenizer.eos_token_id
            config = Qwen2Config(
                vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, rope_theta=m.rope_theta,
                tie_word_embeddings=m.tie_word_embeddings, max_position_embeddings=m.max_position_embeddings,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, param_dtype=m.param_dtype, dtype=m.dtype)
        else:
            config = PRESETS[m.init].replace(param_dtype=m.param_dtype, dtype=m.dtype)
        model = Qwen2(config, rngs=nnx.Rngs(c.seed), init=m.initializer)
        return parallel.shard_model(model, mesh) if mesh is not None else model
    if not Path(m.init).exists():
        raise UserError(f"model.init={m.init!r} is neither a preset ({', '.join(PRESETS)}) nor an existing model folder")
    return checkpoint.load_model(m.init, dtype=m.param_dtype, compute_dtype=m.dtype, mesh=mesh)[0]


def make_mesh(c: TrainConfig):
    """None (one device, no sharding) for a 1x1x1 mesh in a single process, else the mesh over all
    devices of all processes (several processes always train as one mesh); a -1 size fills the devices."""
    m = c.with_mesh_for(jax.device_count()).mesh
    if m.data * m.fsdp * m.tp == 1 and jax.process_count() == 1:
        return None
    return parallel.make_mesh(m.data, m.fsdp, m.tp)


# ----------------------------------------------------------------------------------------------
# Jitted pieces


def adamw(lr, *, b1: float, b2: float, weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))


def grpo_optimizer(c: TrainConfig) -> optax.GradientTransformation:
    o = c.optimizer
    schedule = optax.linear_schedule(0.0, o.lr, o.warmup_steps) if o.warmup_steps else o.lr  # then constant
    return adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, grad_clip=o.grad_clip)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def supervised_step(config: Qwen2Config, optimizer, params, opt_state, tokens, attention_mask, loss_mask):
    """One cross-entropy step on transcripts; loss_mask [B, T] marks the tokens to predict."""
    def loss_fn(p):
        logp = step.token_logprobs(config, p, tokens, attention_mask)
        return -jnp.sum(logp * loss_mask) / jnp.maximum(loss_mask.sum(), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


# ----------------------------------------------------------------------------------------------
# Rollouts


def rollout_batch(prompts: list[list[int]], samples, width: int, *, verdict_open_id: int | None):
    """Numpy arrays of a RolloutBatch (without advantages / reference) from prompt-major samples:
    (prompt_tokens, prompt_lengths, tokens, loss_mask, old_logp, entropy_mask).

    Prompts are right-padded to a multiple of 4 tokens and continuations to `width` (max_new_tokens),
    so the update compiles for few shapes. The entropy mask is the verdict position (the token after
    `\\boxed{`) when verdict_open_id is given, else every generated token."""
    P, R = len(prompts), len(samples)
    prompt_tokens = np.zeros((P, 4 * math.ceil(max(map(len, prompts)) / 4)), np.int32)
    for i, p in enumerate(prompts):
        prompt_tokens[i, :len(p)] = p
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


# ----------------------------------------------------------------------------------------------
# Checkpoints


class Checkpoints:
    """Orbax CheckpointManager over OUTPUT_DIR/checkpoints; each step is also an rrm-jax model checkpoint."""

    def __init__(self, output_dir: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True,
                                               atomicity_options=checkpoint.atomicity_options(output_dir))
        self.root = output_dir / CHECKPOINTS
        self.manager = ocp.CheckpointManager(checkpoint.orbax_path(self.root), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step_number: int, model, opt_state, ref_params, train_state: dict, config: TrainConfig, tokenizer):
        items = dict(checkpoint.model_items(model), opt_state=ocp.args.PyTreeSave(opt_state),
                     train_state=ocp.args.JsonSave(train_state), config=ocp.args.JsonSave(config.to_dict()))
        if ref_params is not None:
            items["ref_params"] = ocp.args.PyTreeSave(ref_params)
        self.manager.save(step_number, args=ocp.args.Composite(**items), force=True)  # every process, collectively
        self.manager.wait_until_finished()
        # The tokenizer goes beside the finalized step for load_tokenizer / judge.
        step_dir = self.root / str(step_number)
        if distributed.is_main_process():
            checkpoint.save_tokenizer(tokenizer, step_dir / checkpoint.ASSETS_DIR)
        distributed.barrier(f"checkpoint-{step_number}-complete")
        return step_dir

    def restore(self, step_number: int, params, opt_state, ref_params):
        def target(tree):
            return ocp.args.PyTreeRestore(item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))

        items = dict(params=target(params), opt_state=target(opt_state), train_state=ocp.args.JsonRestore())
        if ref_params is not None:
            items["ref_params"] = target(ref_params)
        return self.manager.restore(step_number, args=ocp.args.Composite(**items))

    def close(self):
        self.manager.close()


# ----------------------------------------------------------------------------------------------
# Metrics


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line without its newline was cut short by a crash: dropped
    (the resume writes that step again); any other unreadable line is refused."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    rows = []
    for number, line in enumerate(text[:text.rfind("\n") + 1].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path} line {number} is not valid JSON (not a cut-short last line: the file is damaged); "
                            f"repair or delete that line, then --resume again") from None
    return rows


class MetricsLog:
    """metrics.jsonl (appended and flushed to disk each step; on a bucket, whose objects cannot be
    appended to, uploaded whole each step) and TensorBoard events, written by process 0 only."""

    def __init__(self, output_dir: Path, resume_step: int | None):
        """resume_step: the restored step (-1: a resumed run restarting from scratch), None for a new run."""
        self.path = output_dir / METRICS
        self.enabled = distributed.is_main_process()
        if not self.enabled:
            return
        kept = ""
        if resume_step is not None and self.path.exists():
            # rows written after the restored checkpoint are repeated by this run: drop them
            kept = "".join(json.dumps(r) + "\n" for r in read_metrics(self.path) if r["step"] <= resume_step)
            storage.write_text(self.path, kept)
        if storage.can_append(self.path):
            self.file, self.text = open(self.path, "a", encoding="utf-8"), None
        else:
            self.file, self.text = None, kept
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def rows(self) -> list[dict]:
        if not self.enabled:
            return []
        return read_metrics(self.path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(row) + "\n"
        if self.file is None:
            self.text += line
            storage.write_text(self.path, self.text)
        else:
            self.file.write(line)
            self.file.flush()
            os.fsync(self.file.fileno())
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.enabled:
            if self.file is not None:
                self.file.close()
            self.writer.close()


def plot_curve(rows: list[dict], path: Path, task) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    task.plot(rows, ax)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())


# ----------------------------------------------------------------------------------------------
# The run


def _device_batch(arrays, mesh):
    """Batch-shard each array over (data, fsdp) on its leading axis."""
    if mesh is None:
        return arrays
    return tuple(jax.device_put(a, parallel.logical_sharding(("batch",) + ("length",) * (a.ndim - 1), mesh))
                 for a in arrays)


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
    raise UserError(f"--resume of {output_dir} would change what the run is ({changes}); --resume may change only "
                    f"{', '.join(RESUME_MAY_CHANGE)}; for another run choose another --output-dir")


def _prepare_output(output_dir: Path, resume: bool, c: TrainConfig, task) -> None:
    """Check OUTPUT_DIR on every process, then let process 0 create it and write the run config and
    the task's held-out items (kept as they are when a resume continues the run: its evaluations used them)."""
    previous = (output_dir / METRICS).exists() or (output_dir / CHECKPOINTS).exists()
    if previous and not resume:
        raise UserError(f"{output_dir} already holds a training run; pass --resume to continue it or choose "
                        f"another --output-dir")
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


# ----------------------------------------------------------------------------------------------
# The stages of one GRPO step: rollout -> score -> update; then metrics, guard, evaluation, checkpoint


@dataclasses.dataclass
class Run:
    """What stays fixed through a run, built once by `setup`."""

    c: TrainConfig
    output_dir: Path
    mesh: object
    tokenizer: object
    task: "JudgeTask | policy.PolicyTask"  # what differs between judge and policy training: prompts, rewards, evaluation
    model: Qwen2
    optimizer: optax.GradientTransformation
    loss: step.LossSettings
    verdict_open_id: int | None
    main: bool
    progress: bool

    @property
    def mcfg(self) -> Qwen2Config:
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
        task = policy.PolicyTask(c, tokenizer, mesh, model.config, allowed_ids)  # loads the frozen judge onto the same mesh
    else:
        task = JudgeTask(c, tokenizer)
    mcfg = model.config
    plan.check_training_fits(c.with_mesh_for(jax.device_count()), mcfg, "this training config")  # the `rrm-jax plan` check, on these devices
    if c.data.max_prompt_len + c.rollout.max_new_tokens > mcfg.max_position_embeddings:
        raise UserError(f"data.max_prompt_len + rollout.max_new_tokens = {c.data.max_prompt_len + c.rollout.max_new_tokens} "
                        f"exceeds the model's context of {mcfg.max_position_embeddings} tokens")

    verdict_open_id, entropy_ids = None, ()
    if c.loss.entropy_coef > 0 and c.loss.entropy_on == "verdict":
        try:
            entropy_ids = verdict_token_ids(tokenizer)
        except ValueError:
            raise UserError("loss.entropy_on=verdict needs a tokenizer with single verdict tokens (the toy's); "
                            "use loss.entropy_on=completion") from None
        verdict_open_id = tokenizer.convert_tokens_to_ids(BOXED_OPEN)
    loss = step.LossSettings(clip_low=c.loss.clip_low, clip_high=c.loss.clip_high, kl_coef=c.loss.kl_coef,
                             kl_estimator=c.loss.kl_estimator, agg=c.loss.agg, entropy_coef=c.loss.entropy_coef,
                             entropy_token_ids=tuple(entropy_ids), remat=c.loss.remat,
                             allowed_token_ids=allowed_ids)
    grpo.aggregation_count(np.ones((1, 1)), c.loss.agg)  # unknown names fail now, not after the warm-up
    grpo.kl_penalty(jnp.zeros(1), jnp.zeros(1), c.loss.kl_estimator)
    _prepare_output(output_dir, resume, c, task)
    main = distributed.is_main_process()
    return Run(c, output_dir, mesh, tokenizer, task, model, grpo_optimizer(c), loss, verdict_open_id, main, progress and main)


def rollout(run: Run, state: State, prompts: list[list[int]]):
    """G samples per prompt from the current weights, prompt-major."""
    r = run.c.rollout
    return generate.sample(run.model, prompts, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                           num_samples=r.samples_per_prompt, seed=_step_seed(state.rollout_seed, state.step),
                           eos_ids=None if r.stop_at_eos else [], tokenizer=run.tokenizer,
                           allowed_token_ids=run.loss.allowed_token_ids)


def update(run: Run, state: State, prompts, samples, advantages) -> dict:
    """`ppo_epochs` clipped-policy updates on one rollout; the model the sampler reads gets the new weights."""
    arrays = (*rollout_batch(prompts, samples, run.c.rollout.max_new_tokens, verdict_open_id=run.verdict_open_id),
              advantages)
    prompt_tokens, prompt_lengths, tokens, loss_mask, old_logp, entropy_mask, advantages = _device_batch(arrays, run.mesh)
    ref_logp = (step.logprobs_fn(run.mcfg, state.ref_params, prompt_tokens, prompt_lengths, tokens,
                                 allowed_token_ids=run.loss.allowed_token_ids)
                if state.ref_params is not None else jnp.zeros_like(old_logp))
    batch = step.RolloutBatch(prompt_tokens, prompt_lengths, tokens, loss_mask, old_logp, ref_logp, advantages, entropy_mask)
    for _ in range(run.c.loss.ppo_epochs):
        state.params, state.opt_state, metrics = step.update_fn(run.mcfg, run.loss, run.optimizer, run.c.loss.micro_batches,
                                                                state.params, state.opt_state, batch)
    nnx.update(run.model, state.params)  # the sampler reads the new weights; no second copy
    return {k: float(v) for k, v in distributed.fetch(metrics).items()}


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
    return {"step": state.step, **stats, **update_metrics, "tokens_per_s": float(tokens / step_time),
            "rollout_time": t_rollout, "update_time": time.perf_counter() - t_update, "step_time": step_time}


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


def _initial_state(run: Run, ckpts: Checkpoints, start: int | None,
                   stop: resumable.StopSignals) -> tuple[State | None, float]:
    """(state, elapsed before this process started): the warm-up's result for a new run, the latest
    checkpoint for a resumed one; None when a stop signal arrived during the warm-up."""
    c = run.c
    params = run.model.params()
    if start is None:
        params = _warmup(c, run.mcfg, params, run.task, run.tokenizer, run.progress, stop)
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
    return state, saved["elapsed"]


def _new_rollout_seed(seed: int, rollbacks: int) -> int:
    return int(np.random.SeedSequence([seed, 1 << 20, rollbacks]).generate_state(1)[0] & 0x7FFFFFFF)


def train(c: TrainConfig, output_dir: Path, *, resume: bool = False, export_hf: str | None = None,
          progress: bool = True) -> int:
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
        stop.restore()
        ckpts.close()
        if run.main:
            print(f"\n{stop.name} during the format warm-up: nothing to save yet; --resume starts over", file=sys.stderr)
        return stop.exit_code
    if start is not None and start >= c.max_steps and run.main:
        print(f"{output_dir} is already trained to step {start} (max_steps={c.max_steps}); its summary follows. "
              f"For a new run: rm -rf {output_dir}, or --output-dir elsewhere; for more steps: --resume max_steps=N",
              file=sys.stderr)
    metrics = MetricsLog(output_dir, start if start is not None else (-1 if resume else None))
    clock0 = t_start - elapsed_before  # elapsed time counts across resumes

    def elapsed():
        return time.perf_counter() - clock0

    def save():
        train_state = {"step": state.step, "seed": c.seed, "rollout_seed": state.rollout_seed, "rollbacks": state.rollbacks,
                       "data_iterator": run.task.batches.get_state(), "elapsed": elapsed()}
        return ckpts.save(state.step, run.model, state.opt_state, state.ref_params, train_state, c, run.tokenizer)

    if start is None and c.eval_every:
        metrics.log({"step": 0, **run.task.evaluate(run.model), "elapsed": elapsed()})
    # the latest evaluation's figures stay on every frame of the bar until the next one
    shown_eval = next((e for e in map(run.task.eval_progress, reversed(metrics.rows())) if e), {})
    if start is None and (c.guard.on_collapse == "rollback" or c.max_steps == 0):
        save()  # the warm-up's model: a rollback target before the first periodic checkpoint
    detector = guard.CollapseDetector(c.guard.collapse_steps, c.guard.collapse_threshold)
    truncation = guard.TruncationWatch(c.guard.truncation_warning, c.rollout.max_new_tokens)
    bar = _progress_bar(state.step + 1, c.max_steps, run.progress)
    last_saved, save_due, exit_code = start, False, 0
    try:
        while state.step < c.max_steps:
            state.step += 1
            row = grpo_step(run, state)
            collapse = detector.observe(state.step, row)
            row["collapse_streak"] = 0 if detector.streak_start is None else state.step - detector.streak_start + 1
            if c.eval_every and state.step % c.eval_every == 0:
                row.update(run.task.evaluate(run.model))
            row["elapsed"] = elapsed()
            metrics.log(row)
            shown_eval.update(run.task.eval_progress(row))
            bar.set_postfix({**run.task.step_progress(row), **shown_eval}, refresh=False)  # drawn by the update
            bar.update(1)
            warning = truncation.observe(state.step, row["truncated_fraction"])
            if warning and run.main:
                bar.write(warning, file=sys.stderr)
            if distributed.any_process(stop.requested()):  # every process stops at the same step
                step_dir = save()
                if run.main:
                    print(f"\n{stop.name}: saved step {state.step} to {step_dir}; resume with --resume", file=sys.stderr)
                return stop.exit_code
            if collapse is not None:
                if c.guard.on_collapse == "rollback" and state.rollbacks < c.guard.max_rollbacks and ckpts.latest_step() is not None:
                    _roll_back(run, ckpts, state, collapse, metrics, bar)
                    detector.reset()
                    bar.reset(total=max(c.max_steps - state.step, 0))
                    save_due = False
                    continue
                exit_code = _stop_on_collapse(run, ckpts, state, collapse, metrics)
                break
            # A checkpoint is only written at a step without a collapse signal, so the latest one is
            # always good: a due save waits for the next healthy step.
            save_due = save_due or bool(c.checkpoint_every and state.step % c.checkpoint_every == 0)
            if save_due and detector.streak_start is None:
                save()
                last_saved, save_due = state.step, False
        else:
            if last_saved != c.max_steps and c.max_steps > (start or 0):
                save()
    finally:
        bar.close()
        stop.restore()
        rows = metrics.rows()
        metrics.close()
        ckpts.close()
    latest = ckpts.latest_step()
    step_dir = ckpts.root / str(latest) if latest is not None else None
    if run.main and exit_code == 0:
        rows = current_attempt(rows)
        plot_curve(rows, output_dir / "curve.png", run.task)
        if export_hf:  # from the files just written: no process holds all the weights of a sharded model
            convert.checkpoint_to_hf(step_dir, export_hf)
        for line in summary_lines(run.task, rows, output_dir, step_dir, cli_prefix(), run.mcfg.max_position_embeddings):
            print(line)
        if export_hf:
            print(f"Hugging Face export: {export_hf}")
    distributed.barrier("run-finished")
    return exit_code


def _roll_back(run: Run, ckpts: Checkpoints, state: State, collapse: guard.Collapse, metrics: MetricsLog, bar) -> None:
    """Restore the latest (good) checkpoint and go on from it with a new rollout seed."""
    good = ckpts.latest_step()
    rollbacks = state.rollbacks + 1
    _restore(run, ckpts, good, state)
    state.rollbacks = rollbacks
    state.rollout_seed = _new_rollout_seed(run.c.seed, rollbacks)
    metrics.log({"step": collapse.step, "collapse": collapse.signal, "collapse_since": collapse.since,
                 "action": "rollback", "rolled_back_to": good, "rollbacks": rollbacks, "rollout_seed": state.rollout_seed})
    if run.main:
        bar.write(f"{collapse.describe()}; rolled back to checkpoint step {good} ({ckpts.root / str(good)}) with a new "
                  f"rollout seed (rollback {rollbacks} of at most {run.c.guard.max_rollbacks})", file=sys.stderr)


def _stop_on_collapse(run: Run, ckpts: Checkpoints, state: State, collapse: guard.Collapse, metrics: MetricsLog) -> int:
    good = ckpts.latest_step()
    metrics.log({"step": collapse.step, "collapse": collapse.signal, "collapse_since": collapse.since, "action": "stop",
                 "last_good_checkpoint": good, "rollbacks": state.rollbacks})
    if run.main:
        where = (f"last good checkpoint: {ckpts.root / str(good)} (step {good})" if good is not None else
                 f"no checkpoint was saved before it (checkpoint_every={run.c.checkpoint_every})")
        after = f" after {state.rollbacks} rollback(s)" if state.rollbacks else ""
        print(f"\nrrm-jax train: stopped{after}: {collapse.describe()}; {where}; metrics: {run.output_dir / METRICS}. "
              f"guard.on_collapse=rollback retries from the last good checkpoint with a new rollout seed",
              file=sys.stderr)
    return EXIT_COLLAPSE


def current_attempt(rows: list[dict]) -> list[dict]:
    """The metrics rows of the run as it stands: rows a rollback abandoned, and the event rows, left out."""
    kept: list[dict] = []
    for row in rows:
        if row.get("action") == "rollback":
            kept = [r for r in kept if r["step"] <= row["rolled_back_to"]]
        elif "collapse" not in row:
            kept.append(row)
    return kept


def _step_seed(seed: int, step_number: int) -> int:
    return int(np.random.SeedSequence([seed, step_number]).generate_state(1)[0] & 0x7FFFFFFF)


def _warmup(c: TrainConfig, mcfg: Qwen2Config, params, task, tokenizer, progress: bool, stop: resumable.StopSignals):
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
        params, opt_state, loss_value = supervised_step(mcfg, optimizer, params, opt_state, batch["tokens"], attention,
                                                        batch["loss_mask"])
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss_value):.3f}", refresh=False)
    bar.close()
    return params


def _progress_bar(first: int, last: int, enabled: bool, desc: str = "GRPO"):
    from tqdm import tqdm

    return tqdm(total=max(last - first + 1, 0), desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def summary_lines(task, rows: list[dict], output_dir: Path, step_dir: Path, exe: str, context: int) -> list[str]:
    """What a finished run prints: the task's summary and follow-on commands, then the export command
    (the README shows these lines as `make demo` prints them; a test keeps the two equal)."""
    return [*task.summary(rows, output_dir, step_dir, exe, context),
            f"  {exe} convert orbax-to-hf --ckpt {output_dir} --out {output_dir}-hf"]


def cli_prefix() -> str:
    """How to call `rrm-jax` from where the user stands: plain `rrm-jax` when that name on PATH is this
    installation, else the path of this installation's script (e.g. `.venv/bin/rrm-jax` after `make demo`)."""
    script = Path(sys.executable).parent / "rrm-jax"
    on_path = shutil.which("rrm-jax")
    if not script.exists() or (on_path and os.path.samefile(on_path, script)):
        return "rrm-jax"
    relative = os.path.relpath(script)
    return relative if not relative.startswith("..") else str(script.absolute())


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
