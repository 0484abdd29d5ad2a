"""Why the toy judge did (not) learn: supervised training on TRUE verdicts under each initialisation.

For each initializer and seed: the embedded default's model (d 128, 2 layers, 4 / 2 heads, ff 336,
tied embeddings) trained with the format warm-up's optimizer (AdamW lr 1e-3, b2 0.99, clip 1.0,
batch 256) on toy transcripts whose verdict is the CORRECT one, 26 banned letters. Reported: the
attention-logit and output-logit std at initialisation (layer 0, on a toy batch), the verdict loss
and the greedy held-out accuracy (500 pairs, RRM parser) every --eval-every steps.

    .venv/bin/python benchmarks/toy_init.py --seeds 0 1 2 --steps 300 --out benchmarks/results/toy_init.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrm_jax.data import toy
from rrm_jax.data.preference import PreferenceDataset
from rrm_jax.model import qwen2
from rrm_jax.model.config import Qwen2Config
from rrm_jax.rl import judge_task, trainer
from rrm_jax.rl.config import load_config


def init_statistics(config: Qwen2Config, params, tokens) -> dict:
    """Std of layer 0's attention logits and of the output logits on tokens [B, T]."""
    layer0 = jax.tree.map(lambda x: x[0], params["layers"])
    mask = (tokens != 0).astype(jnp.int32)
    x = qwen2._embed(config, params, tokens)
    h = qwen2.rms_norm(x, layer0["attn_norm"], config.rms_norm_eps)
    q, k, _ = qwen2._qkv(config, layer0, h, qwen2.default_positions(mask))
    logits = qwen2.forward(config, params, tokens, attention_mask=mask)
    return {"attention_logit_std": float(jnp.std(qwen2._scores(q, k))), "output_logit_std": float(jnp.std(logits))}


def run(initializer: str, seed: int, steps: int, eval_every: int, overrides: list[str]) -> dict:
    c = load_config(None, [f"seed={seed}", f"model.initializer={initializer}", *overrides])
    tokenizer = toy.toy_tokenizer()
    model = trainer.build_model(c, tokenizer, None)
    config = model.config
    heldout_set = PreferenceDataset(
        toy.make_toy_pairs(500, seed, split="heldout"),
        tokenizer=tokenizer,
        render=toy.render_toy,
        max_prompt_len=c.data.max_prompt_len,
        seed=seed + 1,
    )
    heldout = [heldout_set[i][0] for i in range(len(heldout_set))]
    w = c.warmup
    optimizer = trainer.adamw(w.lr, b1=0.9, b2=w.b2, weight_decay=0.0, grad_clip=w.grad_clip)
    params = jax.tree.map(jnp.copy, model.params())
    opt_state = optimizer.init(params)
    rng = np.random.default_rng([seed, 2])
    first = toy.format_warmup_batch(tokenizer, w.batch_size, np.random.default_rng([seed, 3]), true_verdicts=True)
    result = {
        "initializer": initializer,
        "seed": seed,
        **init_statistics(config, params, jnp.asarray(first["tokens"])),
        "curve": [],
    }
    t0 = time.perf_counter()
    for step_number in range(1, steps + 1):
        batch = toy.format_warmup_batch(tokenizer, w.batch_size, rng, true_verdicts=True)
        attention = (batch["tokens"] != tokenizer.pad_token_id).astype(np.int32)
        verdict_mask = np.zeros_like(batch["loss_mask"])  # the verdict is the 3rd answer token
        verdict_mask[np.arange(len(verdict_mask)), batch["loss_mask"].argmax(1) + 2] = 1.0
        params, opt_state, loss = trainer.supervised_step(
            config, optimizer, params, opt_state, batch["tokens"], attention, batch["loss_mask"]
        )
        if step_number % eval_every == 0:
            nnx.update(model, params)
            params = model.params()
            verdict_logp = trainer.step.token_logprobs(
                config, params, jnp.asarray(batch["tokens"]), jnp.asarray(attention)
            )
            verdict_loss = float(-(verdict_logp * verdict_mask).sum() / verdict_mask.sum())
            acc = judge_task.evaluate(model, heldout, tokenizer, c.rollout.max_new_tokens)
            row = {
                "step": step_number,
                "loss": float(loss),
                "verdict_loss": verdict_loss,
                **acc,
                "elapsed": time.perf_counter() - t0,
            }
            result["curve"].append(row)
            print(json.dumps({"initializer": initializer, "seed": seed, **row}), flush=True)
            params = jax.tree.map(jnp.copy, params)  # the step donates its inputs; the model keeps its own
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--initializers", nargs="+", default=list(qwen2.INITIALIZERS))
    parser.add_argument("--override", nargs="*", default=[], help="train config overrides, e.g. warmup.lr=2e-3")
    parser.add_argument("--out", default="benchmarks/results/toy_init.json")
    args = parser.parse_args()
    results = [
        run(init, seed, args.steps, args.eval_every, args.override) for init in args.initializers for seed in args.seeds
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"{'initializer':<12} {'seed':>4} {'attn std':>8} {'out std':>8}  "
        + "  ".join(f"acc@{r['step']}" for r in results[0]["curve"])
    )
    for r in results:
        print(
            f"{r['initializer']:<12} {r['seed']:>4} {r['attention_logit_std']:>8.3f} {r['output_logit_std']:>8.3f}  "
            + "  ".join(f"{p['eval_accuracy']:>7.3f}" for p in r["curve"])
        )


if __name__ == "__main__":
    main()
