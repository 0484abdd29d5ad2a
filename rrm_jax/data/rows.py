"""The rows of an input: a JSONL, JSON-list or Parquet file, or a Hugging Face dataset (`sources`).

Every reader of rows (`judge`, `eval`, `rank`, and `train`'s preference and prompt data) goes through
`read_rows`, so a file is read the same way and a row is named the same way everywhere: each row comes
with the location that error messages about it name, "FILE line N" (a JSONL line, or the line where an
item of a JSON list starts), "FILE row N" (Parquet) or "DATASET row N".

A file is Parquet by its `.parquet` suffix; any other file is a JSON list when its first non-blank
character is `[`, else JSONL (so `--input <(...)` works too).
"""

from __future__ import annotations

import json
import os

from rrm_jax.data import sources
from rrm_jax.errors import UserError


def read_rows(
    path: str,
    *,
    dataset_config: str | None = None,
    dataset_split: str | None = None,
    columns: tuple[str, ...] = (),
    allowed: str = "",
) -> list[tuple[str, dict]]:
    """(location, row) for each row of `path`, a file or a dataset; every row is a JSON object.

    `columns`: those a dataset's rows need, checked up front (a file's rows are checked by the caller,
    naming the row); `allowed`: what rows need, for the messages ("query, response_1, response_2").
    An unreadable or empty input, a line that is not JSON or a row that is not an object is a UserError.
    """
    if sources.is_dataset(path):
        return sources.load_rows(path, config=dataset_config, split=dataset_split, columns=columns, allowed=allowed)
    if dataset_config or dataset_split:
        raise UserError(f"{path} is a file: {sources.CONFIG_OPTION} and {sources.SPLIT_OPTION} are for datasets")
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    rows = _parquet_rows(path) if path.lower().endswith(".parquet") else _json_rows(path, _read_text(path))
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with fields {allowed}; got {type(row).__name__}")
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def require_text(where: str, row: dict, key: str, allowed: str) -> str:
    """row[key] as a string, or a UserError naming the row (`where`) and the fields rows need."""
    value = row.get(key)
    if not isinstance(value, str):
        problem = "missing field" if key not in row else "field must be a string:"
        raise UserError(f"{where}: {problem} {key!r} (rows need {allowed})")
    return value


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _json_rows(path: str, text: str) -> list[tuple[str, object]]:
    if text.lstrip().startswith("["):
        return _json_list_rows(path, text)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number}: not valid JSON ({e.msg})") from None
    return rows


def _json_list_rows(path: str, text: str) -> list[tuple[str, object]]:
    """The items of a JSON list, each named by the line where it starts."""
    decoder = json.JSONDecoder()

    def line_at(pos: int) -> str:
        return f"{path} line {text.count(chr(10), 0, pos) + 1}"

    def skip_space(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    rows = []
    pos = skip_space(skip_space(0) + 1)  # past the "["
    if text.startswith("]", pos):
        return rows
    while True:
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{line_at(e.pos)}: not valid JSON ({e.msg})") from None
        rows.append((line_at(pos), row))
        pos = skip_space(end)
        if text.startswith("]", pos):
            extra = skip_space(pos + 1)
            if extra < len(text):
                raise UserError(f"{line_at(extra)}: not valid JSON (extra data after the list)")
            return rows
        if not text.startswith(",", pos):
            raise UserError(f"{line_at(pos)}: not valid JSON (expected ',' or ']' after a list item)")
        pos = skip_space(pos + 1)


def _parquet_rows(path: str) -> list[tuple[str, object]]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = [row for batch in pyarrow.parquet.ParquetFile(path).iter_batches() for row in batch.to_pylist()]
    except (OSError, pyarrow.ArrowException) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    return [(f"{path} row {number}", row) for number, row in enumerate(rows, start=1)]
