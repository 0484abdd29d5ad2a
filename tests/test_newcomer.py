"""What a newcomer meets first: installs without torch, accelerator extras, flags taken literally, a
config key mistyped, defaults in --help, and progress figures that move."""

import importlib.metadata
import json
import os
import re
import runpy
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from packaging.requirements import Requirement

from rrm_jax import cli
from rrm_jax.errors import UserError
from rrm_jax.rl.config import load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
# a process in which `import torch` fails, as after `make demo` (which installs no torch)
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None\nfrom rrm_jax.cli import main\nsys.exit(main(sys.argv[1:]))"
NOTICE = "PyTorch was not found"


def without_torch(*argv, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *argv], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_compare_hf_without_torch_is_one_line_before_any_jax_work():
    code = (
        WITHOUT_TORCH.replace("sys.exit(main(sys.argv[1:]))", "rc = main(sys.argv[1:])")
        + "\nprint('jax' in sys.modules)\nsys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "bench", "sample", "--preset", "tiny", "--compare-hf"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout.split() == []  # argparse exits while parsing: nothing else ran
    assert done.stderr == (
        "rrm-jax: error: --compare-hf times transformers on torch, which is not installed: pip install -e '.[hf]'\n"
    )
    assert "torch==" in " ".join(setup_kwargs()["extras_require"]["hf"])


def test_commands_without_torch_do_not_print_transformers_notice(tmp_path):
    from model_utils import make_hf_model

    folder, _ = make_hf_model(tmp_path, tokenizer=True)
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "the judge"}) + "\n")
    done = without_torch(
        "generate",
        "--model",
        str(folder),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "out.jsonl"),
        "--max-new-tokens",
        "2",
    )
    assert done.returncode == 0, done.stderr
    assert NOTICE not in done.stderr and (tmp_path / "out.jsonl").exists()
    # the notice is transformers' own (so the check above means something)
    bare = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None; import transformers"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert NOTICE in bare.stderr


def test_flag_prefixes_are_refused_everywhere(capsys):
    for argv, typo in (
        (["judge", "--model", "M", "--query", "q", "--response-1", "a", "--response-2", "b", "--vote", "3"], "--vote"),
        (["convert", "hf-to-orbax", "--hf", "a", "--out", "b", "--dty", "bf16"], "--dty"),
        (["bench", "sample", "--preset", "tiny", "--compare"], "--compare"),
        (["train", "--output", "runs/x"], "--output"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.build_parser(argv).parse_args(argv)
        assert e.value.code == 2 and f"unrecognized arguments: {typo}" in capsys.readouterr().err


def _parsers():
    import argparse

    def walk(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    for command in cli.COMMANDS:
        yield from walk(cli.build_parser([command]))


def test_help_shows_every_default_and_never_none():
    for parser in _parsers():
        assert not parser.allow_abbrev, parser.prog
        text = parser.format_help()
        assert not re.search(r"\bNone\b", text), parser.prog
        for flag in ("--seed", "--top-k", "--max-think-tokens", "--max-new-tokens", "--dtype", "--config"):
            match = re.search(rf"^  {flag} \S+\s+(.*?)(?=^  -)", text + "  -", re.S | re.M)
            if match:
                assert "default: " in match.group(1), f"{parser.prog} {flag}: {match.group(1)}"


@pytest.mark.parametrize(
    "key, message",
    [
        ("rollout.temprature", "did you mean rollout.temperature?"),
        ("max_step", "did you mean max_steps?"),
        ("data.seed", "did you mean seed?"),  # the right name in the wrong section
        ("rollout.zzz", "rollout has prompts_per_step, samples_per_prompt, temperature"),
        ("zzz", "keys start with one of checkpoint_every, data,"),
    ],
)
def test_unknown_config_key_suggests_the_closest(tmp_path, key, message):
    with pytest.raises(UserError) as e:
        parse_overrides([f"{key}=1"])
    assert str(e.value).startswith(f"unknown config key {key!r} in the command line; {message}")
    assert len(str(e.value)) < 250  # not the ~2,000 characters of ~80 keys
    yaml = tmp_path / "run.yaml"
    yaml.write_text("rollout:\n  temprature: 0.5\n")
    with pytest.raises(
        UserError,
        match=r"unknown config key 'rollout\.temprature' in .*run\.yaml; did you mean "
        r"rollout\.temperature\?$",
    ):
        load_config(str(yaml), [])


def test_written_files_get_the_umask_mode(tmp_path):
    from rrm_jax import storage
    from rrm_jax.data import toy
    from rrm_jax.data.preference import PreferencePair
    from rrm_jax.rl.judge_task import write_pairs

    previous = os.umask(0o022)
    try:
        storage.write_text(tmp_path / "config.yaml", "seed: 0\n")  # how the trainer writes config.yaml
        write_pairs(tmp_path / "heldout.jsonl", [PreferencePair("q", "a", "b")])
        toy.write_heldout(str(tmp_path / "toy.jsonl"), n=3)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"config.yaml": 0o644, "heldout.jsonl": 0o644, "toy.jsonl": 0o644}


def test_bench_refuses_an_existing_json_before_any_work(tmp_path, capsys):
    out = tmp_path / "bench.json"
    out.write_text("{}")
    assert cli.main(["bench", "sample", "--preset", "tiny", "--json", str(out)]) == 2
    assert capsys.readouterr().err == f"rrm-jax: error: output {out} already exists; choose a new path or remove it\n"
    assert out.read_text() == "{}"


def test_mbu_of_a_model_in_cache_is_flagged():
    from rrm_jax.bench import cache_note

    row = {"batch": 2, "step_read_MB": 0.35, "MBU": 1.83}
    assert "not a memory-bandwidth figure" in cache_note(row, 32 * 2**20)
    assert "183%" in cache_note(row, 0)  # above 100% whatever the cache
    assert cache_note({**row, "step_read_MB": 700.0, "MBU": 0.6}, 32 * 2**20) is None


def test_policy_progress_shows_figures_that_move():
    from rrm_jax.rl.judge_task import JudgeTask
    from rrm_jax.rl.policy import PolicyTask

    step = {"reward_mean": 0.5, "reward_std": 0.31, "banned_rate": 0.25}
    assert PolicyTask.step_progress(step) == {"spread": "0.31", "banned": "0.25"}  # never the constant 0.50
    assert PolicyTask.eval_progress({"heldout_banned_rate": 0.125}) == {"heldout_banned": "0.125"}
    assert PolicyTask.eval_progress(step) == {} and JudgeTask.eval_progress(step) == {}
    assert JudgeTask.eval_progress({"eval_accuracy": 0.9}) == {"eval": "0.900"}


# ------------------------------------------------------------------ accelerator extras


def setup_kwargs() -> dict:
    captured = {}
    with mock.patch("setuptools.setup", lambda **kw: captured.update(kw)):
        runpy.run_path(str(ROOT / "setup.py"))
    return captured


def _dry_run(requirements: list[str], tmp_path) -> subprocess.CompletedProcess:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--ignore-installed",
            "--quiet",
            "--timeout",
            "20",
            "--report",
            str(report),
            *requirements,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    done.report = json.loads(report.read_text()) if report.exists() else None
    return done


@pytest.mark.parametrize("extra, jax_extra", [("cuda", "cuda12"), ("cuda13", "cuda13"), ("tpu", "tpu")])
def test_accelerator_extras_pin_the_same_jax_and_resolve(tmp_path, extra, jax_extra):
    kwargs = setup_kwargs()
    pins = {Requirement(r).name: Requirement(r) for r in kwargs["install_requires"]}
    (line,) = kwargs["extras_require"][extra]
    req = Requirement(line)
    assert req.name == "jax" and req.extras == {jax_extra} and req.specifier == pins["jax"].specifier
    assert str(pins["jaxlib"].specifier) == str(pins["jax"].specifier)
    version = next(iter(req.specifier)).version
    assert importlib.metadata.version("jax") == version  # the installed jax describes its own extras
    # what `jax[<extra>]==version` brings besides jaxlib (already pinned): its plugin / runtime, one level
    # deep (--no-deps: the CUDA wheels alone are gigabytes of metadata to fetch)
    wanted = [
        Requirement(r)
        for r in importlib.metadata.requires("jax")
        if Requirement(r).marker and Requirement(r).marker.evaluate({"extra": jax_extra})
    ]
    plugins = [f"{r.name}{r.specifier}" for r in wanted if r.name not in ("jaxlib", "requests")]
    assert plugins
    probe = _dry_run([f"jax=={version}"], tmp_path)
    if probe.returncode != 0:
        pytest.skip(f"package registry unreachable: {probe.stderr.strip().splitlines()[-1:]}")
    done = _dry_run(plugins, tmp_path)
    assert done.returncode == 0, done.stderr
    resolved = {i["metadata"]["name"]: i["metadata"]["version"] for i in done.report["install"]}
    assert set(resolved) == {Requirement(p).name for p in plugins}, resolved


# ------------------------------------------------------------------ the README's contents


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def readme_contents(text: str) -> str:
    """The contents list of the README's ## and ### headings (code blocks skipped)."""
    lines, fenced = [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        match = None if fenced else re.match(r"^(##+) (.*)$", line)
        if match and len(match.group(1)) <= 3 and match.group(2) != "Contents":
            indent = "  " * (len(match.group(1)) - 2)
            lines.append(f"{indent}- [{match.group(2).replace('`', '')}](#{_anchor(match.group(2))})")
    return "\n".join(lines)


def test_readme_contents_list_every_section():
    text = (ROOT / "README.md").read_text()
    listed = text.split("## Contents\n\n", 1)[1].split("\n\n## ", 1)[0]
    assert listed == readme_contents(text), "regenerate it with readme_contents(README text)"
    for link in re.findall(r"\]\(#([^)]+)\)", text):  # every in-page link has its heading
        assert f"(#{link})" in readme_contents(text), link
    assert "source .venv/bin/activate" in text.split("## Judge with RRM-7B")[0]
    for path in ("/models/", "/ckpt/", "/export/", "runs/"):
        assert path in (ROOT / ".gitignore").read_text().split()


def test_readme_follow_on_commands_are_what_make_demo_prints():
    """The commands the README shows after `make demo` are the ones the embedded default's run prints
    (the held-out item, the flags and the paths), spelled as from the repository root after `make demo`."""
    from rrm_jax.rl.judge_task import JudgeTask
    from rrm_jax.rl.tokenizer import load_train_tokenizer
    from rrm_jax.rl.trainer import summary_lines

    c = load_config()
    out = Path("runs/toy")
    printed = summary_lines(
        JudgeTask(c, load_train_tokenizer(c.tokenizer)), [], out, out / "checkpoints" / "400", ".venv/bin/rrm-jax", 64
    )
    commands = [line.strip() for line in printed if line.strip().startswith(".venv/bin/rrm-jax ")]
    assert len(commands) == 3
    text = (ROOT / "README.md").read_text()
    block = text.split("after `make demo`:\n\n```bash\n", 1)[1].split("```", 1)[0]
    assert block.splitlines() == commands
