"""The training config of `rrm-jax train`: one dataclass per YAML section, plus `key=value` overrides.

A config is YAML with the sections below (see rrm_jax/configs/toy.yaml, the embedded default).
Overrides use dotted keys (`rollout.temperature=0.7`), top-level keys (`max_steps=50`) or the short
aliases in `ALIASES` (`lr=3e-4`); values are parsed as YAML scalars. Any key not in the schema, or a
value of the wrong type, is a UserError naming the key and listing what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import typing
from typing import Any

import yaml

from rrm_jax import decoding
from rrm_jax.errors import UserError
from rrm_jax.model.config import INITIALIZERS, Qwen2Config
from rrm_jax.rl.reward import REWARDS


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tp) mesh; one may be -1 for all remaining devices. The default fills
    every device found with fsdp (on one device: no mesh at all)."""

    data: int = 1
    fsdp: int = -1
    tp: int = 1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    init: str | None = None  # None: random init with the shape below; else a preset name or a model path
    initializer: str = "fan-in"  # how a random init draws its weights: rrm_jax.model.config.INITIALIZERS
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 336
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 64
    rope_theta: float = 10000.0
    param_dtype: str = "float32"
    dtype: str = "float32"

    def shape(self, vocab_size: int, bos_token_id: int | None = None, eos_token_id=None) -> Qwen2Config:
        """The model a random init (`init: null`) builds: this section's shape and dtypes, the tokenizer's
        vocabulary size and special tokens."""
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            param_dtype=self.param_dtype,
            dtype=self.dtype,
        )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "toy"  # "toy", a .jsonl / .json / .parquet preference file, or a Hugging Face dataset
    dataset_config: str | None = None  # a dataset source's config (subset)
    dataset_split: str | None = None  # a dataset source's split (default: its only one)
    train_size: int = 65536  # toy only: training pairs generated
    heldout: float = 500  # pairs held out for evaluation (a fraction when < 1)
    max_prompt_len: int = 32
    orders: str = "both"  # "random" or "both"
    chat_template: bool = True  # policy prompts (reward.type=judge): through the policy tokenizer's chat template; false: raw text after BOS


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
    steps: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    b2: float = 0.99
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 256
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    stop_at_eos: bool = (
        True  # false: every sample is exactly max_new_tokens long (the toy policy's fixed-length answers)
    )
    # A constrained vocabulary (space-separated token strings): the policy samples only these tokens and
    # the loss sees the same renormalised distribution; "" = the whole vocabulary.
    allowed_tokens: str = ""
    # The KV cache of the rollout as a pool of pages, in GB per device (on accelerators and meshes, where the
    # engine pages its cache): the traces decoding at once are bounded by the tokens they hold, not by
    # cap-sized slots. null: room for every sequence of the step at its cap (a contiguous cache's size).
    kv_pool_gb: float | None = None


@dataclasses.dataclass(frozen=True)
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    agg: str = "token-mean"
    normalize_std: bool = True
    entropy_coef: float = 0.0  # off unless a config asks (the toy sets 0.1 on the verdict)
    entropy_on: str = "completion"  # or "verdict" (toy tokenizer: the 2-way verdict distribution)
    ppo_epochs: int = 1
    micro_batches: int = 1
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.99
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """Defences against a run that fails silently (rrm_jax/rl/guard.py)."""

    format_penalty: float = (
        0.5  # subtracted from the advantage of each unparseable sample, after the group normalisation
    )
    truncation_penalty: float = 0.0  # the same for samples cut off at rollout.max_new_tokens (no end-of-sequence token)
    truncation_warning: float = 0.5  # warn when truncated_fraction reaches this (0 = never)
    collapse_steps: int = 10  # K: collapse when a signal stays at collapse_threshold this many steps (0 = off)
    collapse_threshold: float = 1.0  # the fraction of unparseable samples / zero-variance groups that counts
    on_collapse: str = "stop"  # "stop" (exit code 3) or "rollback" (to the last good checkpoint, new rollout seed)
    max_rollbacks: int = 2  # then stop


ON_COLLAPSE = ("stop", "rollback")
JUDGE_REWARD = "judge"  # reward.type of policy training; any other type names a verdict reward of judge training


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How rollouts are scored. type "rrm" (judge training): the sample's verdict against the pair's label,
    a name in rrm_jax.rl.reward.REWARDS. type "judge" (policy training): a frozen RRM compares the
    policy's samples within each group (rrm_jax/rl/judge_reward.py); the other keys configure it."""

    type: str = "rrm"
    judge: str | None = None  # the RRM: an HF folder, an rrm-jax checkpoint or a run folder of `rrm-jax train`
    strategy: str = "round_robin"  # round_robin, elo, knockout, circular or reference (rrm_jax/rl/strategies.py)
    votes: int = 1  # judge samples per shown order of a comparison; the majority decides, a tie counts 0.5
    both_orders: bool = False  # every comparison in both A/B orders; otherwise a seeded coin per comparison
    temperature: float = 0.6  # the judge's decoding (the published evaluations' values)
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: 8192, capped per prompt at the judge's context
    max_think_tokens: int | None = None
    strip_think: bool = True  # remove the policy's own <think> block before the judge sees its response
    batch_size: int | None = None  # judge prompts decoding at once (None: all of a round's)
    dtype: str | None = None  # the judge's weights and compute (None: as stored), e.g. bfloat16
    kv_pool_gb: float | None = None  # the judge's KV page pool, GB per device (as rollout.kv_pool_gb)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    max_steps: int = 600
    eval_every: int = 20  # 0 = never
    checkpoint_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 3
    tokenizer: str = "toy-char"  # the built-in character tokenizer, or a tokenizer / model folder
    reward: RewardConfig = RewardConfig()
    mesh: MeshConfig = MeshConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    warmup: WarmupConfig = WarmupConfig()
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    guard: GuardConfig = GuardConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_mesh_for(self, n_devices: int) -> TrainConfig:
        """This config with a -1 mesh size resolved for `n_devices` devices."""
        from rrm_jax.parallel import mesh_shape  # jax: only when a mesh is built

        data, fsdp, tp = mesh_shape(self.mesh.data, self.mesh.fsdp, self.mesh.tp, n_devices)
        return dataclasses.replace(self, mesh=MeshConfig(data, fsdp, tp))


ALIASES = {
    "lr": "optimizer.lr",
    "prompts_per_step": "rollout.prompts_per_step",
    "samples_per_prompt": "rollout.samples_per_prompt",
    "temperature": "rollout.temperature",
    "warmup_steps": "warmup.steps",
    "reward": "reward.type",  # `reward=rrm`, as when reward was a plain name
}


# What `--resume` may change: how long and how often, on which devices and in how much memory, and what
# the guard does on a collapse. Every other key (model, seed, data, reward, task, tokenizer, optimizer,
# loss, rollout) defines the run, so a resume that changes one is refused (`resume_conflicts`).
RESUME_MAY_CHANGE = (
    "max_steps",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tp",
    "loss.micro_batches",
    "loss.remat",
    "reward.batch_size",
    "guard.truncation_warning",
    "guard.collapse_steps",
    "guard.collapse_threshold",
    "guard.on_collapse",
    "guard.max_rollbacks",
)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def resume_conflicts(saved: TrainConfig, given: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, given value) for each key outside RESUME_MAY_CHANGE where `given` differs."""
    old, new = _flat(saved.to_dict()), _flat(given.to_dict())
    return [(key, old[key], new[key]) for key in valid_keys() if key not in RESUME_MAY_CHANGE and old[key] != new[key]]


def default_config_text() -> str:
    return importlib.resources.files("rrm_jax.configs").joinpath("toy.yaml").read_text()


def valid_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default):
            keys += valid_keys(type(f.default), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str, where: str) -> UserError:
    """The closest valid key (`did you mean rollout.temperature?`), else the keys of the section named."""
    keys = valid_keys()
    section, _, name = key.rpartition(".")
    inside = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
    by_name = {}  # last part -> the keys ending in it (aliases: themselves)
    for k in keys + list(ALIASES):
        by_name.setdefault(k.rpartition(".")[2], []).append(k)
    close = (
        [inside[m] for m in difflib.get_close_matches(name, inside, n=1)]  # a typo within its section
        or by_name.get(name)  # the right name in the wrong section
        or [k for m in difflib.get_close_matches(name, by_name, n=1) for k in by_name[m]]
    )
    if close:
        return UserError(f"unknown config key {key!r} in {where}; did you mean {' or '.join(close)}?")
    if section and inside:
        return UserError(f"unknown config key {key!r} in {where}; {section} has {', '.join(inside)}")
    top = sorted({k.split(".", 1)[0] for k in keys})
    return UserError(f"unknown config key {key!r} in {where}; keys start with one of {', '.join(top)}")


def _coerce(key: str, value: Any, hint, where: str):
    """value checked against the field's type; ints are accepted for floats."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if base is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if base is bool and isinstance(value, bool):
        return value
    if base is not bool and isinstance(value, base) and not isinstance(value, bool):
        return value
    raise UserError(f"config key {key}={value!r} in {where} must be of type {getattr(base, '__name__', base)}")


def _build(cls, values: dict, prefix: str, where: str, overridden: frozenset = frozenset()):
    """The dataclass of `values`; a key in `overridden` (dotted) came from the command line and errors say so."""
    if not isinstance(values, dict):
        raise UserError(
            f"config section {prefix.rstrip('.') or '(top level)'} in {where} must be a mapping, got {values!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(prefix + str(key), where)
        f = fields[key]
        if dataclasses.is_dataclass(f.default):
            kwargs[key] = _build(type(f.default), value or {}, f"{prefix}{key}.", where, overridden)
        else:
            source = "the command line" if prefix + key in overridden else where
            kwargs[key] = _coerce(prefix + key, value, hints[key], source)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _unknown(key, where)
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value (e.g. max_steps=100)")
        key = ALIASES.get(key, key)
        if key not in valid_keys():
            raise _unknown(key, "the command line")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            raise UserError(f"override {item!r}: cannot parse the value {text!r}") from None
        parsed.append((key, value))
    return parsed


def load_config(path: str | None = None, overrides: list[str] = (), *, base: dict | None = None) -> TrainConfig:
    """The config of `path` (default: the packaged toy.yaml; `base`: an already-parsed dict such as a
    run's saved config) with `overrides` (["key=value", ...]) applied."""
    if base is not None:
        tree, where = base, "the saved run config"
    elif path is None:
        tree, where = yaml.safe_load(default_config_text()), "the embedded default config"
    else:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f)
        except OSError as e:
            raise UserError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        where = path
    tree = dict(tree or {})
    if isinstance(tree.get("reward"), str):  # `reward: rrm`, so that reward.judge=... can be set on top
        tree["reward"] = {"type": tree["reward"]}
    parsed = parse_overrides(list(overrides))
    for key, value in parsed:
        _set_dotted(tree, key, value, "the command line")
    return validate(_build(TrainConfig, tree, "", where, frozenset(key for key, _ in parsed)))


def validate(c: TrainConfig) -> TrainConfig:
    checks = [
        (c.max_steps >= 0, "max_steps must be >= 0"),
        (c.eval_every >= 0, "eval_every must be >= 0 (0 = never)"),
        (c.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0 = only at the end)"),
        (c.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        (
            c.rollout.prompts_per_step >= 1 and c.rollout.samples_per_prompt >= 1,
            "rollout.prompts_per_step and rollout.samples_per_prompt must be >= 1",
        ),
        (c.loss.ppo_epochs >= 1, "loss.ppo_epochs must be >= 1"),
        (
            c.loss.micro_batches >= 1
            and (c.rollout.prompts_per_step * c.rollout.samples_per_prompt) % c.loss.micro_batches == 0,
            f"loss.micro_batches={c.loss.micro_batches} must divide prompts_per_step*samples_per_prompt="
            f"{c.rollout.prompts_per_step * c.rollout.samples_per_prompt}",
        ),
        (
            c.loss.entropy_on in ("verdict", "completion"),
            f"loss.entropy_on={c.loss.entropy_on!r}: use verdict or completion",
        ),
        (
            not (c.rollout.allowed_tokens.strip() and c.loss.entropy_on == "verdict" and c.loss.entropy_coef > 0),
            "rollout.allowed_tokens goes with loss.entropy_on=completion (the verdict bonus reads the verdict tokens)",
        ),
        (
            c.model.initializer in INITIALIZERS,
            f"model.initializer={c.model.initializer!r}: use one of {', '.join(INITIALIZERS)}",
        ),
        (c.data.orders in ("random", "both"), f"data.orders={c.data.orders!r}: use random or both"),
        (
            c.warmup.steps == 0 or c.data.source == "toy",
            "warmup.steps > 0 (the format warm-up) needs data.source=toy; set warmup.steps=0 for other data",
        ),
        (c.data.heldout > 0, "data.heldout must be > 0"),
        (
            all(v >= 1 or v == -1 for v in (c.mesh.data, c.mesh.fsdp, c.mesh.tp))
            and (c.mesh.data, c.mesh.fsdp, c.mesh.tp).count(-1) <= 1,
            f"mesh data={c.mesh.data} fsdp={c.mesh.fsdp} tp={c.mesh.tp}: sizes must be >= 1 with at most one -1 "
            f"(all remaining devices; the default is fsdp=-1, so set mesh.fsdp=1 when another axis is -1)",
        ),
        (
            c.guard.on_collapse in ON_COLLAPSE,
            f"guard.on_collapse={c.guard.on_collapse!r}: use {' or '.join(ON_COLLAPSE)}",
        ),
        (
            c.guard.collapse_steps >= 0 and c.guard.max_rollbacks >= 0,
            "guard.collapse_steps and guard.max_rollbacks must be >= 0",
        ),
        (0 < c.guard.collapse_threshold <= 1, "guard.collapse_threshold must be in (0, 1]"),
        (
            c.reward.type == JUDGE_REWARD or c.reward.type in REWARDS,
            f"reward.type={c.reward.type!r}: use {JUDGE_REWARD} (a judge compares the samples) or a reward of "
            f"rrm_jax.rl.reward.REWARDS ({', '.join(sorted(REWARDS))})",
        ),
        (
            c.reward.type != JUDGE_REWARD or bool(c.reward.judge),
            "reward.type=judge needs reward.judge=PATH (an RRM: HF folder, rrm-jax checkpoint or run folder)",
        ),
        (c.reward.votes >= 1, f"reward.votes must be >= 1, got {c.reward.votes}"),
        *(
            (pool is None or pool > 0, f"{key}={pool} must be a positive number of GB (or null: no pool)")
            for key, pool in (("rollout.kv_pool_gb", c.rollout.kv_pool_gb), ("reward.kv_pool_gb", c.reward.kv_pool_gb))
        ),
        (c.reward.batch_size is None or c.reward.batch_size >= 1, "reward.batch_size must be >= 1"),
        (
            c.reward.dtype in (None, "float32", "bfloat16", "float16"),
            f"reward.dtype={c.reward.dtype!r}: use float32, bfloat16 or float16 (or leave it unset: as stored)",
        ),
        (
            c.guard.format_penalty >= 0 and c.guard.truncation_penalty >= 0,
            "guard.format_penalty and guard.truncation_penalty must be >= 0 (they are subtracted)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    # the policy's and the judge's sampling: a bad value is a UserError naming its key (reward.top_p ...)
    decoding.check(
        "rollout", temperature=c.rollout.temperature, top_p=c.rollout.top_p, max_new_tokens=c.rollout.max_new_tokens
    )
    decoding.check(
        "reward",
        temperature=c.reward.temperature,
        top_p=c.reward.top_p,
        max_new_tokens=c.reward.max_new_tokens,
        max_think_tokens=c.reward.max_think_tokens,
    )
    return c
