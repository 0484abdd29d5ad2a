"""Hugging Face datasets as inputs: a folder written by `Dataset.save_to_disk`, or a hub name.

Every command that reads rows (`judge`, `eval`, `rank`, `generate`, and `train`'s `data.source`) takes
a file (JSONL, JSON, Parquet) or a dataset:
  - a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (a DatasetDict needs a split);
  - a hub name such as `allenai/reward-bench`, with an optional config (subset) and split, loaded by
    `datasets.load_dataset`: from the local Hugging Face cache when offline (HF_DATASETS_OFFLINE=1), or
    when a short connection check finds the Hub unreachable (instead of `datasets`' retries for minutes).
A name whose folder part exists here (`data/pairs` next to a `data/` folder) is a missing local file, not
a hub name: a typo of `data/pairs.jsonl` must not become a download.
`datasets` is imported only when a dataset is used. Rows come back as plain dicts, each with the
location error messages name ("allenai/reward-bench (split filtered) row 12").
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from urllib.parse import urlsplit

from rrm_jax.errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# how the user sets the config and split: flags of the commands, keys of the training config
CONFIG_OPTION = "--dataset-config (train: data.dataset_config)"
SPLIT_OPTION = "--dataset-split (train: data.dataset_split)"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_CHECK_TIMEOUT_S = 3.0


def is_dataset(source: str) -> bool:
    """True when `source` names a dataset rather than a file: a folder, or a hub name (no file suffix)."""
    if os.path.isdir(source):
        return True
    if os.path.exists(source) or source.lower().endswith(FILE_SUFFIXES):
        return False
    folder = os.path.dirname(source)
    if folder and os.path.isdir(folder):  # a local path whose file is missing
        return False
    return bool(_HUB_NAME.match(source))


def describe(source: str, config: str | None = None, split: str | None = None) -> str:
    """How messages name a dataset: `NAME (config C, split S)`."""
    details = [f"config {config}"] * bool(config) + [f"split {split}"] * bool(split)
    return f"{source} ({', '.join(details)})" if details else source


def load_rows(
    source: str,
    *,
    config: str | None = None,
    split: str | None = None,
    columns: tuple[str, ...] = (),
    allowed: str = "",
) -> list[tuple[str, dict]]:
    """(location, row) for every row of the dataset `source`. `columns`: those every row needs; a
    missing one is a UserError naming the column and the dataset (`allowed` says what rows need)."""
    dataset = _load(source, config, split)
    name = describe(source, config, split)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"{name}: missing column {missing[0]!r} (it has {', '.join(dataset.column_names) or 'none'}; "
            f"rows need {allowed or ', '.join(columns)})"
        )
    rows = [(f"{name} row {number}", row) for number, row in enumerate(dataset.to_list(), start=1)]
    if not rows:
        raise UserError(f"{name}: no rows")
    return rows


def _load(source: str, config: str | None, split: str | None):
    import datasets  # heavy: only when a dataset is used

    # datasets' progress bars and "using the cached version" warnings would bury our one-line messages
    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        return _load_quietly(datasets, source, config, split)
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _load_quietly(datasets, source: str, config: str | None, split: str | None):
    if os.path.isdir(source):
        try:
            loaded = datasets.load_from_disk(source)
        except FileNotFoundError:
            raise UserError(
                f"{source}: a folder, but not one written by Dataset.save_to_disk "
                f"(no dataset_info.json / dataset_dict.json)"
            ) from None
        if config:
            raise UserError(f"{source}: a dataset saved to disk has no configs; drop {CONFIG_OPTION}")
        return _pick_split(source, loaded, split)
    print(f"treating {source} as a Hugging Face dataset (no file or folder of that name here)", file=sys.stderr)
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    endpoint = _unreachable_hub(datasets)
    try:
        with _offline(datasets) if endpoint else contextlib.nullcontext():
            loaded = datasets.load_dataset(source, config, split=split)
    except ValueError as e:  # unknown split or config
        raise UserError(f"{describe(source, config, split)}: {str(e).splitlines()[0]}") from None
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        if endpoint:
            raise UserError(
                f"{source}: no such file or folder, and no dataset of that name in the local Hugging Face "
                f"cache ({cache}); the Hub ({endpoint}) cannot be reached"
            ) from None
        raise UserError(
            f"{source}: no such file or folder, and no dataset of that name in the local Hugging Face "
            f"cache ({cache}) or on the Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    return loaded if split else _pick_split(source, loaded, None)  # with a split, load_dataset returns just that


def _unreachable_hub(datasets) -> str | None:
    """The Hub's address when a connection to it fails within HUB_CHECK_TIMEOUT_S (None when offline mode
    is set: then nothing is attempted anyway)."""
    from huggingface_hub import constants

    if datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE:
        return None
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=HUB_CHECK_TIMEOUT_S
        ).close()
    except OSError:
        return constants.ENDPOINT
    return None


@contextlib.contextmanager
def _offline(datasets):
    """Offline mode (the local cache only) for one load: what HF_DATASETS_OFFLINE=1 does, set at run time."""
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _pick_split(source: str, loaded, split: str | None):
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        if split:
            raise UserError(f"{source}: a single saved split has no splits to choose from; drop {SPLIT_OPTION}")
        return loaded
    if split is None:
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise UserError(f"{source} has the splits {', '.join(loaded)}; choose one with {SPLIT_OPTION}")
    if split not in loaded:
        raise UserError(f"{source} has no split {split!r}; it has {', '.join(loaded)}")
    return loaded[split]
