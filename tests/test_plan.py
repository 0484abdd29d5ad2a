"""Memory planner (`rrm-jax plan`): figures against hand-computed values, refusals, the shipped configs."""

import math
from pathlib import Path

import jax
import pytest

from rrm_jax import parallel, plan
from rrm_jax.cli import main
from rrm_jax.errors import UserError
from rrm_jax.model.qwen2 import Qwen2
from rrm_jax.rl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_7B = str(ROOT / "configs" / "rrm_7b_v5p.yaml")
WITHOUT_WEIGHTS = {
    "rrm_7b_v5p": "r1-distill-qwen-7b",
    "rrm_32b_v5p": "r1-distill-qwen-32b",
    "rrm_7b_8xh100": "r1-distill-qwen-7b",
}


def test_7b_v5p_figures_match_hand_computation():
    c = load_config(CONFIG_7B, ["model.init=r1-distill-qwen-7b"])
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tp) == (1, 32, 2)
    assert (c.rollout.prompts_per_step, c.rollout.samples_per_prompt, c.loss.micro_batches) == (256, 16, 64)
    p = plan.plan_memory(c, plan.model_shape(c))

    # DeepSeek-R1-Distill-Qwen-7B: V=152064 D=3584 F=18944 L=28 N=28 K=4 H=128, float32 weights.
    # Every matrix has an fsdp-sharded hidden axis and a tp-sharded heads / MLP / vocab axis: split 32*2 = 64
    # ways. Biases have only heads (tp, 2 ways); norms are replicated.
    matrices = 2 * 152064 * 3584 + 28 * (2 * 3584 * 28 * 128 + 2 * 3584 * 4 * 128 + 3 * 3584 * 18944)
    biases = 28 * (28 * 128 + 2 * 4 * 128)
    norms = 28 * 2 * 3584 + 3584
    assert matrices + biases + norms == 7_615_616_512  # the published 7.6B
    params = (matrices / 64 + biases / 2 + norms) * 4
    assert params == 477_030_400
    assert p.term("params") == params
    assert p.term("grads") == 2 * params  # micro_batches > 1: accumulator + one micro-batch's gradient
    assert p.term("optimizer") == 2 * params
    assert p.term("reference") == 0  # kl_coef = 0

    # 4096 sequences / 64 micro-batches / 32 batch shards = 2 sequences of 4096 + 8192 tokens per device
    b, T = 2, 12288
    assert (p.micro_batch_sequences, p.sequence_length) == (b, T)
    layer_inputs = 28 * b * T * 3584 * 2  # bfloat16, one per layer (remat)
    attention = 2 * b * (28 // 2) * T * T * 4  # float32 probabilities + gradient, 14 heads per device
    mlp_and_projections = b * T * (3 * 18944 // 2 + 2 * 14 * 128 + 2 * 2 * 128) * 2
    assert p.term("activations") == layer_inputs + attention + mlp_and_projections == 40_353_398_784
    assert p.term("logits") == 2 * b * T * (152064 // 2) * 4 == 14_948_499_456
    # rollout: a pool of 11.2 GB in whole pages of 64 positions, 2 of the 4 kv heads a device
    kv_token = 2 * 28 * 2 * 128 * 2
    assert p.term("kv_cache") == 11_200_000_000 // (64 * kv_token) * 64 * kv_token == 11_199_053_824
    # without the pool: 4096 sequences / 32 shards = 128 per device, each at its cap
    contiguous = plan.plan_memory(
        load_config(CONFIG_7B, ["model.init=r1-distill-qwen-7b", "rollout.kv_pool_gb=null"]), p.model
    )
    assert contiguous.term("kv_cache") == 2 * 28 * 128 * T * 2 * 128 * 2 == 45_097_156_608
    assert p.peak_phase == "update"
    assert p.peak == 3 * params + 2 * params + 40_353_398_784 + 14_948_499_456
    plan.check_fits(p, 95e9, "rrm_7b_v5p")


def test_parameter_bytes_match_real_sharded_model():
    # the planner's sharding against what JAX actually places on one device of a 2x2x2 CPU mesh
    c = load_config(None, ["model.init=tiny", "mesh.data=2", "mesh.fsdp=2", "mesh.tp=2"])
    config = plan.model_shape(c)
    from flax import nnx

    model = parallel.shard_model(Qwen2(config, rngs=nnx.Rngs(0)), parallel.make_mesh(2, 2, 2))
    first = jax.devices()[0]
    on_first = sum(
        s.data.nbytes for leaf in jax.tree.leaves(model.params()) for s in leaf.addressable_shards if s.device == first
    )
    assert plan.plan_memory(c, config).term("params") == on_first


@pytest.mark.parametrize(
    "name, devices, memory", [("rrm_7b_v5p", 64, 95), ("rrm_32b_v5p", 128, 95), ("rrm_7b_8xh100", 8, 80)]
)
def test_shipped_configs_fit(name, devices, memory, capsys):
    path = ROOT / "configs" / f"{name}.yaml"
    rc = main(
        [
            "plan",
            "--config",
            str(path),
            "--devices",
            str(devices),
            "--device-memory",
            str(memory),
            f"model.init={WITHOUT_WEIGHTS[name]}",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and " fits (" in out
    c = load_config(str(path))  # the recipe
    assert (
        c.rollout.samples_per_prompt,
        c.rollout.temperature,
        c.rollout.max_new_tokens,
        c.optimizer.lr,
        c.reward.type,
    ) == (16, 0.8, 8192, 1e-6, "rrm")
    assert c.loss.remat and c.model.dtype == "bfloat16"


@pytest.mark.parametrize(
    "overrides, memory, largest, remedy",
    [
        # one device holds the whole 7B: float32 weights 30.5 GB + gradients 30.5 + AdamW 61 > 80
        (
            [
                "mesh.fsdp=1",
                "mesh.tp=1",
                "rollout.prompts_per_step=1",
                "rollout.samples_per_prompt=1",
                "loss.micro_batches=1",
                "data.max_prompt_len=256",
                "rollout.max_new_tokens=256",
            ],
            80,
            "optimizer state",
            "mesh.fsdp",
        ),
        # 16384 rollouts: 512 sequences of 12288 tokens per device in the KV cache
        (
            ["rollout.prompts_per_step=1024", "loss.micro_batches=512", "rollout.kv_pool_gb=null"],
            95,
            "rollout KV cache",
            "rollout.prompts_per_step",
        ),
        (["loss.remat=false"], 95, "activations", "loss.remat=true"),
    ],
)
def test_config_that_cannot_fit_is_refused(overrides, memory, largest, remedy, capsys):
    rc = main(
        ["plan", "--config", CONFIG_7B, "--device-memory", str(memory), "model.init=r1-distill-qwen-7b", *overrides]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and err.startswith("rrm-jax: error: ") and "does not fit" in err
    assert f"largest term: {largest}" in err and remedy in err


POLICY_8XH100 = str(ROOT / "configs" / "policy_7b_8xh100.yaml")
WITHOUT_POLICY_WEIGHTS = ["model.init=r1-distill-qwen-7b", "reward.judge=r1-distill-qwen-7b"]


@pytest.mark.parametrize("name, devices, memory", [("policy_7b_8xh100", 8, 80), ("policy_7b_v5p", 64, 95)])
def test_shipped_policy_configs_fit(name, devices, memory, capsys):
    rc = main(
        [
            "plan",
            "--config",
            str(ROOT / "configs" / f"{name}.yaml"),
            "--devices",
            str(devices),
            "--device-memory",
            str(memory),
            *WITHOUT_POLICY_WEIGHTS,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and " fits (" in out and "judge KV page pool" in out and "judging phase total" in out
    assert "judging: " in out and " sequences per batch shard decode at once in the pool" in out


def test_judge_terms_match_hand_computation():
    c = load_config(POLICY_8XH100, WITHOUT_POLICY_WEIGHTS)
    p = plan.plan_memory(c, plan.model_shape(c), plan.judge_shape(c))
    # the judge: RRM-7B's shape in bfloat16 on the policy's fsdp=4 x tp=2 mesh (as the policy's weights shard)
    matrices = 2 * 152064 * 3584 + 28 * (2 * 3584 * 28 * 128 + 2 * 3584 * 4 * 128 + 3 * 3584 * 18944)
    biases = 28 * (28 * 128 + 2 * 4 * 128)
    norms = 28 * 2 * 3584 + 3584
    assert p.term("judge_params") == (matrices / 8 + biases / 2 + norms) * 2
    # the judge's pool: 12.8 GB in whole pages of 64 positions, 2 of the 4 kv heads a device
    kv_token = 2 * 28 * 2 * 128 * 2
    assert p.term("judge_kv_cache") == 12_800_000_000 // (64 * kv_token) * 64 * kv_token
    # without it: elo, 48 prompts x 28 pairs = 1344 comparisons, one order, at most batch_size 128 decoding, 1
    # vote, over data*fsdp = 4 shards: 32 rows of 1024 + 2 x 4096 + 640 + 4096 tokens
    c_contiguous = load_config(
        POLICY_8XH100, [*WITHOUT_POLICY_WEIGHTS, "reward.kv_pool_gb=null", "reward.batch_size=128"]
    )
    contiguous = plan.plan_memory(c_contiguous, plan.model_shape(c_contiguous), plan.judge_shape(c_contiguous))
    assert contiguous.term("judge_kv_cache") == 2 * 28 * 32 * 13952 * 2 * 128 * 2
    assert p.phase_total("judging") == (
        p.term("params") + p.term("optimizer") + p.term("judge_params") + p.term("judge_kv_cache")
    )
    assert p.phase_total("update") >= p.term("judge_params") + p.term("grads")  # the judge stays on the devices


def test_judge_cache_that_cannot_fit_is_refused(capsys):
    rc = main(
        [
            "plan",
            "--config",
            POLICY_8XH100,
            "--device-memory",
            "80",
            *WITHOUT_POLICY_WEIGHTS,
            "reward.batch_size=2048",
            "reward.both_orders=true",
            "reward.max_new_tokens=8192",
            "reward.kv_pool_gb=null",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "judging phase" in err
    assert "largest term: judge KV cache" in err and "reward.batch_size" in err


def test_device_count_must_match_mesh(capsys):
    assert main(["plan", "--config", CONFIG_7B, "--devices", "128", "model.init=r1-distill-qwen-7b"]) == 2
    assert "has 64 slots but there are 128 devices" in capsys.readouterr().err


def test_missing_weights_suggest_a_preset():
    c = load_config(CONFIG_7B)
    with pytest.raises(UserError, match="does not exist on this machine.*model.init=r1-distill-qwen-7b"):
        plan.model_shape(c)


def test_reference_model_counts_when_kl_is_on():
    c = load_config(CONFIG_7B, ["model.init=r1-distill-qwen-7b", "loss.kl_coef=0.001", "loss.micro_batches=1024"])
    p = plan.plan_memory(c, plan.model_shape(c))
    assert p.term("reference") == p.term("params")
    assert p.term("grads") == 2 * p.term("params") and p.micro_batch_sequences == math.ceil(1024 / 1024 / 32)


def test_rollout_page_pool_counts_pages_and_the_traces_it_holds_at_once():
    """rollout.kv_pool_gb: the KV term is the pool (whole pages), and the traces at once follow from the
    pages a prompt group holds, counted by hand: RRM-7B on v5p (32 batch shards, 2 of 4 kv heads a device,
    bfloat16), prompts of 4096 (64 full pages shared by the 16 samples) and 1638 new tokens on average (26
    pages a sample): 64 + 16 * 26 = 480 pages a prompt."""
    c = load_config(CONFIG_7B, ["model.init=r1-distill-qwen-7b", "rollout.kv_pool_gb=10"])
    p = plan.plan_memory(c, plan.model_shape(c))
    kv_token = 2 * 28 * 2 * 128 * 2
    pages = 10 * 10**9 // (64 * kv_token)
    assert pages == 5_449 and p.term("kv_cache") == pages * 64 * kv_token
    (rollout,) = p.concurrency
    assert (rollout.sequences, rollout.pool_pages, rollout.mean_new_tokens) == (128, pages, 8192 // 5)
    assert rollout.at_once == min(128, 16 * ((pages - 1) // 480)) == 128  # 11 prompts' worth: every row fits
    assert rollout.cap_slots == 10 * 10**9 // (12288 * kv_token) == 28  # cap-sized slots: fewer than the rows

    # a step of 4096 prompts (2048 rows a shard) in a 2 GB pool: whole prompts of 16, 3 of them
    c = load_config(
        CONFIG_7B,
        [
            "model.init=r1-distill-qwen-7b",
            "rollout.kv_pool_gb=2",
            "rollout.prompts_per_step=4096",
            "loss.micro_batches=2048",
        ],
    )
    (rollout,) = plan.plan_memory(c, plan.model_shape(c), mean_new_tokens=1000).concurrency
    group = 64 + 16 * math.ceil(1000 / 64)
    assert rollout.at_once == 16 * ((2 * 10**9 // (64 * kv_token) - 1) // group) == 16 * 3
    assert rollout.cap_slots == 2 * 10**9 // (12288 * kv_token) == 5


def test_plan_prints_traces_at_once_and_refuses_a_bad_pool(capsys):
    args = ["plan", "--config", CONFIG_7B, "model.init=r1-distill-qwen-7b", "rollout.kv_pool_gb=10"]
    assert main(args + ["--mean-new-tokens", "4000"]) == 0
    out = capsys.readouterr().out
    assert "rollout KV page pool (5449 pages)" in out
    assert "rollout: 80 of 128 sequences per batch shard decode at once in the pool" in out  # 5 prompts of 1072 pages
    assert "4096 prompt + 4000 new tokens on average" in out and "cap-sized slots in the same memory: 28" in out
    assert main(["plan", "--config", CONFIG_7B, "model.init=r1-distill-qwen-7b", "rollout.kv_pool_gb=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rrm-jax: error: rollout.kv_pool_gb=0.0 must be a positive number of GB (or null: no pool)"]
    # 0.3 GB: 163 pages of 64 positions (28,672 bytes a position), where one trace of 12,288 takes 192 + 1
    assert main(["plan", "--config", CONFIG_7B, "model.init=r1-distill-qwen-7b", "rollout.kv_pool_gb=0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "rollout.kv_pool_gb=0.3 makes 163 pages of 64 positions per device, fewer than the 193" in err[0]
    )
