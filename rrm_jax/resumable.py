"""Resumable outputs: a partial file beside the output, the final file by rename, stopping on SIGTERM / Ctrl-C.

`rrm-jax judge / eval / rank / generate --output OUT` write every finished item into OUT.partial as it
finishes, and OUT itself only when the whole job is done (written beside it and renamed, in input
order). OUT.partial is JSON lines:

    {"rrm_jax_partial": 1, "command": "judge", "settings": {...},     the header: what the run was,
     "model_loaded": {"path": ..., "config_sha256": ...}}             and the model it loaded
    {"call": 0, "index": 17, ...}                                     one finished item per line

Each batch of records is one write followed by fsync, so kill -9 loses at most the batch in flight; a
last line without its newline (a write cut short) is dropped on `--resume`, any other unreadable line
is refused. `--resume` refuses a partial file whose header settings differ from this run's, naming
the difference, and one whose model differs from the one this run loads (`rrm_jax.model_identity`: a
training run folder loads its newest step, so `--model RUN` may load another model after training
went on); the model is compared by what is loaded, so a resume may name the same checkpoint another
way. A partial file of an older rrm-jax has no `model_loaded`: it resumes as before (its settings'
`model`, the path given, must match) with a note that the checkpoint could not be checked. Without
`--resume` an existing partial file is refused rather than overwritten.

In a multi-process run process 0 alone reads and writes the files (the others may not even see the
same disk) and hands what it read to the others (`distributed.broadcast_object`).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from rrm_jax import distributed, storage
from rrm_jax.errors import EXIT_CTRL_C, UserError
from rrm_jax.model_identity import describe

PARTIAL_SUFFIX = ".partial"
FORMAT_VERSION = 1


class Interrupted(Exception):
    """Every process agreed to stop (a signal on at least one): finished items are in the partial file."""


class StopSignals:
    """While installed (from construction, or as a `with` block, until `restore()`), SIGTERM (a
    preemption) and SIGINT (Ctrl-C) only raise a flag: the work polls `requested()` between steps or
    batches, saves what it finished and exits with `exit_code` (0 after SIGTERM, so a preempted job
    counts as done; 130 after Ctrl-C). A second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        """The signal this process received; SIGTERM when another process was the one preempted."""
        return signal.Signals(self.received or signal.SIGTERM).name

    @property
    def exit_code(self) -> int:
        return EXIT_CTRL_C if self.received == signal.SIGINT else 0

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def check_output_folder(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: output folder {folder} does not exist")


def write_output(path: str, text: str) -> None:
    """Write `text` to `path` whole, never half of it (`storage.write_text`: a temporary file beside it,
    fsynced, then renamed). The file gets the mode any new file gets here (0666 less the umask). Process
    0 only."""
    if not distributed.is_main_process():
        return
    check_output_folder(path)
    storage.write_text(path, text)


def _read(path: str, command: str, settings: dict, model: dict) -> tuple[list[dict], int]:
    """(records, byte length of the good part) of an existing partial file, checked against this run."""
    with open(path, "rb") as f:
        data = f.read()
    good = data[: data.rfind(b"\n") + 1]  # a last line without its newline was cut short by a kill: dropped
    lines = good.decode("utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(
                f"{path} line {number} is not valid JSON (not a cut-short last line: the file is damaged); "
                f"delete it to start over"
            ) from None
    header = rows[0] if rows else None
    if not isinstance(header, dict) or header.get("rrm_jax_partial") != FORMAT_VERSION:
        raise UserError(f"{path} is not an rrm-jax partial file (no header line); delete it to start over")
    if header.get("command") != command:
        raise UserError(
            f"{path} was written by `rrm-jax {header.get('command')}`, not `rrm-jax {command}`; "
            f"delete it or choose another --output"
        )
    stored = header.get("settings", {})
    compared = set(stored) | set(settings)
    if "model_loaded" in header:
        if header["model_loaded"] != model:
            raise UserError(
                f"{path} holds results of {describe(header['model_loaded'])} but --model now loads "
                f"{describe(model)}; resume with --model {header['model_loaded']['path']} if it still "
                f"exists, or delete {path} to start over"
            )
        compared.discard("model")  # the path as given: the same model reached another way is the same model
    differences = [
        f"{key}={stored.get(key)!r} there, {settings.get(key)!r} here"
        for key in sorted(compared)
        if stored.get(key) != settings.get(key)
    ]
    if differences:
        raise UserError(
            f"{path} is from a run with other settings ({'; '.join(differences)}); resume with the "
            f"same settings, or delete it to start over"
        )
    if "model_loaded" not in header:
        print(
            f"note: {path} was written by an older rrm-jax that did not record which checkpoint it loaded; "
            f"resuming without checking that --model still loads the same one",
            file=sys.stderr,
        )
    return rows[1:], len(good)


class PartialFile:
    """The partial file of one output: the records finished so far, and where new ones are appended.

    settings: everything the results depend on (model, input and its rows' hash, seed, votes,
    decoding, ...); stored in the header and compared on resume.
    model: `model_identity.identify(--model)`, the model the run loads; stored and compared too."""

    def __init__(self, output: str, command: str, settings: dict, *, resume: bool, model: dict):
        self.output, self.path = output, output + PARTIAL_SUFFIX
        self._file = None
        self._header = None
        loaded = {"records": [], "error": None}
        if distributed.is_main_process():
            loaded = self._open(command, settings, resume, model)
        loaded = distributed.broadcast_object(loaded)  # every process learns what is done, or the error
        if loaded["error"]:
            self.close()
            raise UserError(loaded["error"])
        self.records: list[dict] = loaded["records"]

    def _open(self, command: str, settings: dict, resume: bool, model: dict) -> dict:
        try:
            check_output_folder(self.output)
            if os.path.exists(self.output):  # no command replaces an output (README: "Existing outputs")
                raise UserError(f"output {self.output} already exists; choose a new path or remove it")
            exists = os.path.exists(self.path)
            if exists and not resume:
                raise UserError(
                    f"{self.path} holds the finished items of an interrupted run; pass --resume to "
                    f"continue it, or delete it to start over"
                )
            if exists:
                records, good = _read(self.path, command, settings, model)
                self._file = open(self.path, "r+b")
                self._file.truncate(good)
                self._file.seek(good)
            else:  # created with the first finished batch: a run that fails before one leaves nothing behind
                records = []
                self._header = {
                    "rrm_jax_partial": FORMAT_VERSION,
                    "command": command,
                    "settings": settings,
                    "model_loaded": model,
                }
        except UserError as e:
            return {"records": [], "error": str(e)}
        return {"records": records, "error": None}

    def _write(self, records: list[dict]) -> None:
        self._file.write(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, records: list[dict]) -> None:
        """Add finished records (process 0 writes; one write and fsync per call)."""
        if not records or not distributed.is_main_process():
            return
        if self._file is None:
            self._file = open(self.path, "xb")
            records = [self._header, *records]
        self._write(records)

    def finish(self, text: str) -> None:
        """Write the complete output (by rename), then remove the partial file."""
        write_output(self.output, text)
        self.close()
        if distributed.is_main_process() and os.path.exists(self.path):
            os.remove(self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
