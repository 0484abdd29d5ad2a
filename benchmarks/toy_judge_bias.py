"""Where the toy judge errs: its greedy accuracy on fresh toy items by the clean response's shown
position, by the banned letter's position, and by letter (the judge a policy run is rewarded by).

    .venv/bin/python benchmarks/toy_judge_bias.py --judge runs/toy --items 3000
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import rrm_jax
from rrm_jax import checkpoint
from rrm_jax.data import toy
from rrm_jax.rrm.prompt import parse_verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default="runs/toy")
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    model, _ = checkpoint.load_model(args.judge)
    tokenizer = checkpoint.load_tokenizer(args.judge)
    rng = np.random.default_rng(args.seed)
    items, prompts = [], []
    for _ in range(args.items):
        x = toy.LETTERS[rng.integers(26)]
        others = [c for c in toy.LETTERS if c != x]
        clean = "".join(rng.choice(others, 5))
        dirty = list(rng.choice(others, 5))
        position = int(rng.integers(5))
        dirty[position] = x
        clean_first = bool(rng.integers(2))
        first, second = (clean, "".join(dirty)) if clean_first else ("".join(dirty), clean)
        items.append((x, position, clean_first))
        prompts.append(
            tokenizer(toy.render_toy(tokenizer, toy.question_for(x), first, second), add_special_tokens=False)[
                "input_ids"
            ]
        )
    outs = rrm_jax.sample(model, prompts, max_new_tokens=6, temperature=0.0, tokenizer=tokenizer)
    right = np.array(
        [parse_verdict(o.text) == (1 if clean_first else 2) for o, (_, _, clean_first) in zip(outs, items)]
    )

    def accuracy(mask) -> float:
        return round(float(right[np.asarray(mask)].mean()), 3)

    print(
        json.dumps(
            {
                "judge": args.judge,
                "items": args.items,
                "accuracy": accuracy([True] * len(items)),
                "clean_shown_first": accuracy([c for _, _, c in items]),
                "clean_shown_second": accuracy([not c for _, _, c in items]),
                "by_banned_position": {p: accuracy([q == p for _, q, _ in items]) for p in range(5)},
                "worst_letters": sorted((accuracy([x == c for x, _, _ in items]), c) for c in toy.LETTERS)[:5],
            }
        )
    )


if __name__ == "__main__":
    main()
