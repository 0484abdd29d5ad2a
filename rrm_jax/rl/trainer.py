"""`rrm-jax train`: GRPO training of a judge, from a laptop CPU to a pod, exactly resumable.

One run, in OUTPUT_DIR:

    config.yaml        the resolved config (the base of `--resume`)
    heldout.jsonl      the held-out pairs, `{prompt, chosen, rejected}` (`rrm-jax eval --format pairs`)
    checkpoints/<step>/  Orbax CheckpointManager steps: params + model_config (an rrm-jax checkpoint, so
                       `rrm_jax.load_model(OUTPUT_DIR)` and every command accept OUTPUT_DIR), assets/
                       (tokenizer), opt_state, ref_params (only with a KL term), train_state (step,
                       seed, data-iterator position, elapsed time), config
    metrics.jsonl      one JSON object per step; tb/ TensorBoard events; curve.png at the end

Phases: (A) an optional supervised format warm-up on toy transcripts with RANDOM verdicts (the model
learns to answer, not what to answer), then (B) GRPO: B prompts -> G samples each -> rewards ->
group advantages -> `ppo_epochs` clipped-policy updates -> AdamW. The sampler and the update share
one copy of the weights: the updated arrays are put back into the model the sampler reads.

All randomness is a function of (seed, step) and the data iterator's position, both in the
checkpoint, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import sys
import tempfile
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

from rrm_jax import checkpoint, distributed, generate, parallel, plan
from rrm_jax.data import toy
from rrm_jax.data.char_tokenizer import BOXED_OPEN, verdict_token_ids
from rrm_jax.data.preference import PreferenceDataset, preference_batches, read_preferences, split_heldout
from rrm_jax.errors import UserError
from rrm_jax.model import convert
from rrm_jax.model.config import PRESETS, Qwen2Config
from rrm_jax.model.qwen2 import Qwen2
from rrm_jax.rl import grpo, step
from rrm_jax.rl.config import TrainConfig, load_config
from rrm_jax.rl.reward import compute_rewards
from rrm_jax.rrm.prompt import parse_verdict, render

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
HELDOUT = "heldout.jsonl"
TOY_TOKENIZER = "toy-char"
TIMING_KEYS = ("step_time", "rollout_time", "update_time", "tokens_per_s", "elapsed")  # vary run to run


# ----------------------------------------------------------------------------------------------
# Set-up: tokenizer, model, data


def load_train_tokenizer(name: str):
    if name == TOY_TOKENIZER:
        return toy.toy_tokenizer()
    tokenizer = checkpoint.load_tokenizer(name) if Path(name).exists() else None
    if tokenizer is None:
        raise UserError(f"tokenizer={name!r}: use {TOY_TOKENIZER} or a model / tokenizer folder that holds one")
    return tokenizer


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
    devices of all processes (several processes always train as one mesh)."""
    if c.mesh.data * c.mesh.fsdp * c.mesh.tp == 1 and jax.process_count() == 1:
        return None
    return parallel.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tp)


def load_pairs(c: TrainConfig):
    """(train pairs, held-out pairs, render function)."""
    if c.data.source == "toy":
        heldout = int(c.data.heldout)
        return (toy.make_toy_pairs(c.data.train_size, c.seed), toy.make_toy_pairs(heldout, c.seed, split="heldout"),
                toy.render_toy)
    pairs = read_preferences(c.data.source)
    train, heldout = split_heldout(pairs, c.data.heldout, seed=c.seed)
    if not train or not heldout:
        raise UserError(f"{c.data.source}: {len(pairs)} pairs leave {len(train)} for training and {len(heldout)} "
                        f"held out (data.heldout={c.data.heldout}); both need at least one")
    return train, heldout, render


def write_pairs(path: Path, pairs) -> None:
    """`{prompt, chosen, rejected}` JSONL, written to a temp file and renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.query, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    os.replace(tmp, path)


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


def evaluate(model, examples, tokenizer, max_new_tokens: int) -> dict:
    """Held-out accuracy of greedy verdicts parsed by the RRM parser."""
    outs = generate.sample(model, [e.prompt_ids for e in examples], max_new_tokens=max_new_tokens, temperature=0.0,
                           tokenizer=tokenizer)
    verdicts = [parse_verdict(o.text) for o in outs]
    return {"eval_accuracy": float(np.mean([v == e.label for v, e in zip(verdicts, examples)])),
            "eval_unparseable": float(np.mean([v is None for v in verdicts]))}


# ----------------------------------------------------------------------------------------------
# Checkpoints


class Checkpoints:
    """Orbax CheckpointManager over OUTPUT_DIR/checkpoints; each step is also an rrm-jax model checkpoint."""

    def __init__(self, output_dir: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.root = output_dir / CHECKPOINTS
        self.manager = ocp.CheckpointManager(self.root.absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step_number: int, model, opt_state, ref_params, train_state: dict, config: TrainConfig, tokenizer):
        items = dict(checkpoint.model_items(model), opt_state=ocp.args.PyTreeSave(opt_state),
                     train_state=ocp.args.JsonSave(train_state), config=ocp.args.JsonSave(config.to_dict()))
        if ref_params is not None:
            items["ref_params"] = ocp.args.PyTreeSave(ref_params)
        self.manager.save(step_number, args=ocp.args.Composite(**items), force=True)  # every process, collectively
        self.manager.wait_until_finished()
        # The tokenizer goes beside the finalized step (renamed into place) for load_tokenizer / judge.
        step_dir = self.root / str(step_number)
        if distributed.is_main_process():
            stage = Path(tempfile.mkdtemp(prefix=".assets-", dir=step_dir))
            tokenizer.save_pretrained(str(stage))
            os.replace(stage, step_dir / checkpoint.ASSETS_DIR)
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


class MetricsLog:
    """metrics.jsonl (append, flushed each step) and TensorBoard events, written by process 0 only."""

    def __init__(self, output_dir: Path, resume_step: int | None):
        """resume_step: the restored step (-1: a resumed run restarting from scratch), None for a new run."""
        self.path = output_dir / METRICS
        self.enabled = distributed.is_main_process()
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            # rows written after the restored checkpoint are repeated by this run: drop them
            rows = [r for r in self.rows() if r["step"] <= resume_step]
            fd, tmp = tempfile.mkstemp(dir=output_dir, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def rows(self) -> list[dict]:
        if not self.enabled:
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()


def plot_curve(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    ax.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train accuracy (sampled)", alpha=0.6)
    ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="held-out accuracy (greedy)")
    ax.axhline(0.9, color="gray", ls="--", lw=0.8)
    ax.axhline(0.5, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("pairwise accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The run


class _Preemption:
    """SIGTERM (a TPU preemption) sets a flag; the loop saves the current step and exits 0."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


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


def _prepare_output(output_dir: Path, resume: bool, c: TrainConfig, heldout_pairs) -> None:
    """Check OUTPUT_DIR on every process, then let process 0 create it and write the run config and
    the held-out pairs."""
    previous = (output_dir / METRICS).exists() or (output_dir / CHECKPOINTS).exists()
    if previous and not resume:
        raise UserError(f"{output_dir} already holds a training run; pass --resume to continue it or choose "
                        f"another --output-dir")
    distributed.barrier("output-dir-checked")  # before process 0 writes anything the others would see
    if distributed.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_CONFIG).write_text(yaml.safe_dump(c.to_dict(), sort_keys=False))
        write_pairs(output_dir / HELDOUT, heldout_pairs)
    distributed.barrier("output-dir-ready")


def global_batch(examples, width: int) -> tuple[list[list[int]], list[int]]:
    """(prompt ids, labels) of the whole step: every process's slice of the batch, in process order.
    Only token ids and labels travel; each process rendered and tokenized its own slice."""
    if jax.process_count() == 1:
        return [e.prompt_ids for e in examples], [e.label for e in examples]
    ids = np.zeros((len(examples), width), np.int32)
    lengths = np.array([len(e.prompt_ids) for e in examples], np.int32)
    for i, e in enumerate(examples):
        ids[i, :len(e.prompt_ids)] = e.prompt_ids
    labels = np.array([e.label for e in examples], np.int32)
    ids, lengths, labels = (distributed.gather_processes(a).reshape(-1, *a.shape[1:]) for a in (ids, lengths, labels))
    return [row[:n].tolist() for row, n in zip(ids, lengths)], labels.tolist()


def resolve_config(config_path: str | None, overrides: list[str], output_dir: Path, resume: bool) -> TrainConfig:
    saved = output_dir / RUN_CONFIG
    if resume and config_path is None and saved.exists():
        return load_config(overrides=overrides, base=yaml.safe_load(saved.read_text()))
    return load_config(config_path, overrides)


def train(c: TrainConfig, output_dir: Path, *, resume: bool = False, export_hf: str | None = None,
          progress: bool = True) -> int:
    t_start = time.perf_counter()
    mesh = make_mesh(c)
    tokenizer = load_train_tokenizer(c.tokenizer)
    # Everything that can be wrong with the data is found before OUTPUT_DIR is touched.
    train_pairs, heldout_pairs, render_fn = load_pairs(c)
    dataset = PreferenceDataset(train_pairs, tokenizer=tokenizer, render=render_fn, max_prompt_len=c.data.max_prompt_len,
                                seed=c.seed, orders=c.data.orders)
    heldout_set = PreferenceDataset(heldout_pairs, tokenizer=tokenizer, render=render_fn,
                                    max_prompt_len=c.data.max_prompt_len, seed=c.seed + 1, orders="random")
    heldout = [heldout_set[i][0] for i in range(len(heldout_set))]  # every process evaluates all of it
    batches = iter(preference_batches(dataset, batch_size=c.rollout.prompts_per_step, seed=c.seed))  # this process's slice
    model = build_model(c, tokenizer, mesh)
    mcfg = model.config
    plan.check_training_fits(c, mcfg, "this training config")  # the `rrm-jax plan` check, on these devices
    if c.data.max_prompt_len + c.rollout.max_new_tokens > mcfg.max_position_embeddings:
        raise UserError(f"data.max_prompt_len + rollout.max_new_tokens = {c.data.max_prompt_len + c.rollout.max_new_tokens} "
                        f"exceeds the model's context of {mcfg.max_position_embeddings} tokens")
    _prepare_output(output_dir, resume, c, heldout_pairs)
    main = distributed.is_main_process()
    progress = progress and main

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
                             entropy_token_ids=tuple(entropy_ids), remat=c.loss.remat)
    grpo.aggregation_count(np.ones((1, 1)), c.loss.agg)  # unknown names fail now, not after the warm-up
    grpo.kl_penalty(jnp.zeros(1), jnp.zeros(1), c.loss.kl_estimator)

    ckpts = Checkpoints(output_dir, c.keep_checkpoints)
    start = ckpts.latest_step() if resume else None
    optimizer = grpo_optimizer(c)
    params = model.params()
    elapsed_before = 0.0
    ref_params = None

    preemption = _Preemption()
    if start is None:
        params = _warmup(c, mcfg, params, tokenizer, progress, preemption)
        if preemption.requested:  # already agreed by every process in _warmup
            preemption.restore()
            ckpts.close()
            if main:
                print("SIGTERM during the format warm-up: nothing to save yet; --resume starts over", file=sys.stderr)
            return 0
        nnx.update(model, params)
        params = model.params()
        opt_state = _on_mesh(optimizer.init(params), mesh)
        if c.loss.kl_coef > 0:
            ref_params = jax.tree.map(jnp.copy, params)  # frozen reference: the policy GRPO starts from
    else:
        opt_state = _on_mesh(optimizer.init(params), mesh)  # the restore target: restored arrays keep its layout
        if c.loss.kl_coef > 0:
            ref_params = jax.tree.map(jnp.copy, params)
        restored = ckpts.restore(start, params, opt_state, ref_params)
        params, opt_state = restored["params"], restored["opt_state"]
        if ref_params is not None:
            ref_params = restored["ref_params"]
        nnx.update(model, params)
        state = restored["train_state"]
        batches.set_state(state["data_iterator"])
        elapsed_before = state["elapsed"]
        if main:
            print(f"resuming {output_dir} from step {start}", file=sys.stderr)

    metrics = MetricsLog(output_dir, start if start is not None else (-1 if resume else None))
    first = (start or 0) + 1
    clock0 = t_start - elapsed_before  # elapsed time counts across resumes

    def elapsed():
        return time.perf_counter() - clock0

    if start is None and c.eval_every:
        metrics.log({"step": 0, **evaluate(model, heldout, tokenizer, c.rollout.max_new_tokens), "elapsed": elapsed()})

    def save(step_number):
        state = {"step": step_number, "seed": c.seed, "data_iterator": batches.get_state(), "elapsed": elapsed()}
        return ckpts.save(step_number, model, opt_state, ref_params, state, c, tokenizer)

    G = c.rollout.samples_per_prompt
    last_saved = start
    bar = _progress_bar(first, c.max_steps, progress)
    try:
        for step_number in range(first, c.max_steps + 1):
            t0 = time.perf_counter()
            prompts, labels = global_batch(next(batches), c.data.max_prompt_len)
            samples = generate.sample(
                model, prompts, max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature,
                top_p=c.rollout.top_p, num_samples=G, seed=_step_seed(c.seed, step_number), tokenizer=tokenizer)
            t_rollout = time.perf_counter() - t0
            preferred = np.repeat(labels, G)
            texts = [s.text for s in samples]
            rewards = compute_rewards(texts, preferred, reward=c.reward)
            advantages = grpo.group_advantages(rewards, G, normalize_std=c.loss.normalize_std)
            prompt_tokens, prompt_lengths, tokens, loss_mask, old_logp, entropy_mask, advantages = _device_batch(
                (*rollout_batch(prompts, samples, c.rollout.max_new_tokens, verdict_open_id=verdict_open_id),
                 advantages), mesh)
            ref_logp = (step.logprobs_fn(mcfg, ref_params, prompt_tokens, prompt_lengths, tokens)
                        if ref_params is not None else jnp.zeros_like(old_logp))
            batch = step.RolloutBatch(prompt_tokens, prompt_lengths, tokens, loss_mask, old_logp, ref_logp,
                                      advantages, entropy_mask)
            for _ in range(c.loss.ppo_epochs):
                params, opt_state, update_metrics = step.update_fn(mcfg, loss, optimizer, c.loss.micro_batches,
                                                                   params, opt_state, batch)
            nnx.update(model, params)  # the sampler reads the new weights; no second copy
            update_metrics = {k: float(v) for k, v in distributed.fetch(update_metrics).items()}
            step_time = time.perf_counter() - t0

            verdicts = [parse_verdict(t) for t in texts]
            lengths = np.array([len(s.output_ids) for s in samples])
            groups = rewards.reshape(-1, G)
            row = {
                "step": step_number,
                "reward_mean": float(rewards.mean()),
                "accuracy": float(np.mean([v == p for v, p in zip(verdicts, preferred)])),
                "unparseable": float(np.mean([v is None for v in verdicts])),
                "response_len_mean": float(lengths.mean()),
                "response_len_max": int(lengths.max()),
                "truncated_fraction": float(np.mean([s.finish_reason == generate.FINISH_LENGTH for s in samples])),
                "zero_variance_groups": float(np.mean(groups.max(axis=1) == groups.min(axis=1))),
                **update_metrics,
                "tokens_per_s": float(lengths.sum() / step_time),
                "rollout_time": t_rollout,
                "update_time": step_time - t_rollout,
                "step_time": step_time,
            }
            if c.eval_every and step_number % c.eval_every == 0:
                row.update(evaluate(model, heldout, tokenizer, c.rollout.max_new_tokens))
            row["elapsed"] = elapsed()
            metrics.log(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}",
                            **({"eval": f"{row['eval_accuracy']:.3f}"} if "eval_accuracy" in row else {}))
            if distributed.any_process(preemption.requested):  # every process stops at the same step
                step_dir = save(step_number)
                if main:
                    print(f"\nSIGTERM: saved step {step_number} to {step_dir}; resume with --resume", file=sys.stderr)
                return 0
            if c.checkpoint_every and step_number % c.checkpoint_every == 0:
                save(step_number)
                last_saved = step_number
        if last_saved != c.max_steps and c.max_steps >= first:
            save(c.max_steps)
        elif start is None and c.max_steps == 0:
            save(0)
    finally:
        bar.close()
        preemption.restore()
        rows = metrics.rows()
        metrics.close()
        ckpts.close()
    step_dir = ckpts.root / str(ckpts.latest_step())
    if main:
        plot_curve(rows, output_dir / "curve.png")
        if export_hf:  # from the files just written: no process holds all the weights of a sharded model
            convert.checkpoint_to_hf(step_dir, export_hf)
        _print_summary(output_dir, step_dir, rows, export_hf)
    distributed.barrier("run-finished")
    return 0


def _step_seed(seed: int, step_number: int) -> int:
    return int(np.random.SeedSequence([seed, step_number]).generate_state(1)[0] & 0x7FFFFFFF)


def _warmup(c: TrainConfig, mcfg: Qwen2Config, params, tokenizer, progress: bool, preemption: _Preemption):
    """Phase A: supervised format warm-up on transcripts with random verdicts."""
    w = c.warmup
    if not w.steps:
        return params
    optimizer = adamw(w.lr, b1=0.9, b2=w.b2, weight_decay=0.0, grad_clip=w.grad_clip)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng([c.seed, 2])
    params = jax.tree.map(jnp.copy, params)  # the step donates its inputs; keep the model's arrays intact
    bar = _progress_bar(1, w.steps, progress, desc="format warm-up")
    for _ in range(w.steps):
        if distributed.any_process(preemption.requested):
            preemption.requested = True
            break
        batch = toy.format_warmup_batch(tokenizer, w.batch_size, rng)
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


def _print_summary(output_dir: Path, step_dir: Path, rows: list[dict], export_hf: str | None) -> None:
    evals = [r for r in rows if "eval_accuracy" in r]
    out = str(output_dir)
    if evals:
        best = max(evals, key=lambda r: r["eval_accuracy"])
        reached = next((r for r in evals if r["eval_accuracy"] >= 0.9), None)
        print(f"held-out accuracy: {evals[0]['eval_accuracy']:.3f} at step {evals[0]['step']} -> "
              f"{evals[-1]['eval_accuracy']:.3f} at step {evals[-1]['step']} (best {best['eval_accuracy']:.3f})")
        if reached:
            print(f"first >= 0.90 at step {reached['step']}, {reached['elapsed']:.0f} s after start")
    print(f"checkpoint: {step_dir}  (metrics: {output_dir / METRICS}, curve: {output_dir / 'curve.png'})")
    if export_hf:
        print(f"Hugging Face export: {export_hf}")
    print("try it:")
    print(f"  rrm-jax judge --model {out} --query 'avoid q' --response-1 abcde --response-2 abqde --max-new-tokens 8")
    print(f"  rrm-jax eval --model {out} --input {output_dir / HELDOUT} --format pairs --output {output_dir / 'eval.json'} "
          f"--temperature 0 --max-new-tokens 8")
    print(f"  rrm-jax convert orbax-to-hf --ckpt {out} --out {out}-hf")


# ----------------------------------------------------------------------------------------------
# CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="training YAML (default: the embedded toy task)")
    parser.add_argument("--output-dir", default="runs/toy", help="run folder (default runs/toy)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    parser.add_argument("--export-hf", default=None, help="also write the final model as a Hugging Face folder here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. max_steps=300 seed=1 rollout.temperature=0.8")
    parser.set_defaults(run=run_train)


def run_train(args) -> int:
    output_dir = Path(args.output_dir)
    config = resolve_config(args.config, args.overrides, output_dir, args.resume)
    if args.export_hf:
        checkpoint.check_output_free(args.export_hf)
    return train(config, output_dir, resume=args.resume, export_hf=args.export_hf, progress=not args.no_progress)
