"""A training run's checkpoints: an Orbax CheckpointManager over OUTPUT_DIR/checkpoints.

Each step holds params + model_config (so it is also an rrm-jax model checkpoint, rrm_jax/checkpoint.py),
assets/ (the tokenizer), opt_state, ref_params (only with a KL term), train_state (step, seeds,
data-iterator position, elapsed time) and the config. Saves are synchronous and collective (every
process calls them); only committed steps are read back.
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from rrm_jax import checkpoint, distributed
from rrm_jax.rl.config import TrainConfig

CHECKPOINTS = "checkpoints"  # the folder in OUTPUT_DIR


class Checkpoints:
    """Orbax CheckpointManager over OUTPUT_DIR/checkpoints; each step is also an rrm-jax model checkpoint."""

    def __init__(self, output_dir: Path, keep: int):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
            atomicity_options=checkpoint.atomicity_options(output_dir),
        )
        self.root = output_dir / CHECKPOINTS
        self.manager = ocp.CheckpointManager(checkpoint.orbax_path(self.root), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step_number: int, model, opt_state, ref_params, train_state: dict, config: TrainConfig, tokenizer):
        items = dict(
            checkpoint.model_items(model),
            opt_state=ocp.args.PyTreeSave(opt_state),
            train_state=ocp.args.JsonSave(train_state),
            config=ocp.args.JsonSave(config.to_dict()),
        )
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
