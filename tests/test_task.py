"""The trainer's task contract (rrm_jax/rl/task.py): both tasks implement it, the trainer asks for nothing
else, and the modules below the trainer in the data flow never import it."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest

from rrm_jax.rl.config import load_config
from rrm_jax.rl.judge_task import JudgeTask
from rrm_jax.rl.policy import PolicyTask
from rrm_jax.rl.task import Task
from rrm_jax.rl.tokenizer import load_train_tokenizer

RL = Path(__file__).resolve().parents[1] / "rrm_jax" / "rl"
METHODS = sorted(name for name, value in vars(Task).items() if inspect.isfunction(value) and not name.startswith("_"))


def _parameters(function) -> list[tuple[object, str | None]]:
    """Each parameter's kind, and the names of those the trainer passes by keyword."""
    return [
        (p.kind, p.name if p.kind == p.KEYWORD_ONLY else None)
        for p in inspect.signature(function).parameters.values()
        if p.name != "self"
    ]


def test_the_protocol_declares_what_the_issue_names():
    assert METHODS == sorted(
        [
            "next_batch",
            "score",
            "evaluate",
            "step_progress",
            "eval_progress",
            "warmup_batch",
            "write_heldout",
            "summary",
            "plot",
        ]
    )
    assert Task.__annotations__ == {"batches": "ResumableIterator"}


@pytest.mark.parametrize("task", [JudgeTask, PolicyTask])
@pytest.mark.parametrize("name", METHODS)
def test_each_task_implements_each_method_with_the_protocols_parameters(task, name):
    assert _parameters(getattr(task, name)) == _parameters(getattr(Task, name))


def test_a_tasks_batch_stream_is_resumable():
    """`batches` is the task's grain iterator: set back to a saved position it draws the same batches."""
    c = load_config(None, ["data.train_size=64", "data.heldout=4", "rollout.prompts_per_step=8"])
    task = JudgeTask(c, load_train_tokenizer(c.tokenizer))
    assert all(callable(getattr(task.batches, m, None)) for m in ("__next__", "get_state", "set_state"))
    saved = task.batches.get_state()
    first = [e.prompt_ids for e in next(task.batches)]
    task.batches.set_state(saved)
    assert [e.prompt_ids for e in next(task.batches)] == first
    # the policy's task sets its stream the same way (building one needs a judge model)
    init = ast.parse(textwrap.dedent(inspect.getsource(PolicyTask.__init__)))
    assigned = {
        t.attr
        for node in ast.walk(init)
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Attribute)
    }
    assert "batches" in assigned


def _task_members_used(path: Path) -> set[str]:
    """Every attribute read from a name `task` or an attribute `.task` (`run.task`, `self.run.task`)."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "task") or (
                isinstance(owner, ast.Attribute) and owner.attr == "task"
            ):
                used.add(node.attr)
    return used


def test_the_trainer_asks_its_task_only_for_the_protocols_members():
    used = _task_members_used(RL / "trainer.py") | _task_members_used(RL / "plot.py")
    assert used <= set(METHODS) | {"batches"}, used - set(METHODS)
    assert {"next_batch", "score", "evaluate", "batches", "summary", "plot"} <= used


@pytest.mark.parametrize(
    "module",
    [
        "task",
        "checkpoints",
        "metrics",
        "plot",
        "step",
        "config",
        "judge_task",
        "policy",
        "judge_reward",
        "guard",
        "grpo",
        "rollout_stats",
    ],
)
def test_modules_below_the_trainer_do_not_import_it(module):
    imported = set()
    for node in ast.walk(ast.parse((RL / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    assert not {"rrm_jax.rl.trainer", "rrm_jax.rl.train_cli"} & imported
