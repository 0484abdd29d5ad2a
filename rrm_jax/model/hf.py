"""Hugging Face Qwen2 folders: config.json translation, the HF tensors of a config and streaming safetensors I/O.

An HF folder holds config.json, the weights as `model.safetensors` or as shards listed in
`model.safetensors.index.json`, and optional tokenizer / generation files ("assets", copied verbatim).

Safetensors files are read and written here by byte ranges with plain file I/O, never memory-mapped:
the pages of a mapped file that a read touches count towards the process RSS, and conversion must
keep host memory near one tensor however large the model. The format is small: 8 bytes little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}} (offsets relative to the end of the
header), then the raw little-endian tensor bytes.

How each HF tensor maps onto our parameters (its name, and its layout: torch Linear weights are
[out, in], ours [in, ...] so `x @ w` needs no transpose) is part of each parameter's record in
`rrm_jax.model.weights`; here those records are expanded per layer into the tensors of one config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from rrm_jax import storage
from rrm_jax.errors import UserError
from rrm_jax.model.config import Qwen2Config
from rrm_jax.model.weights import BY_PATH, Weight, param_shapes, weights

SUPPORTED_MODEL_TYPES = ("qwen2",)
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Files copied verbatim between HF folders and checkpoints: the tokenizer and the sampling defaults.
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one makes a loadable tokenizer

_ST_TO_NUMPY = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
_NUMPY_TO_ST = {v: k for k, v in _ST_TO_NUMPY.items()}
_MAX_HEADER_BYTES = 100 << 20  # the safetensors reference implementation's own limit
# Large tensors are streamed in blocks of at most this many bytes (one layer of a stacked tensor is one block).
BLOCK_BYTES = 64 << 20


# ----------------------------------------------------------------------------------------------
# config.json


def _require(hf: dict, key: str, source: str):
    if key not in hf:
        raise UserError(f"{source} has no {key!r}; a Qwen2 config.json needs it")
    return hf[key]


def _rope_theta(hf: dict, source: str) -> float:
    """transformers 4.x writes `rope_theta` at the top level, 5.x writes `rope_parameters.rope_theta`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UserError(f"{source}: rope type {rope_type!r} is not supported; only the default rotary embedding is")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def config_from_hf(hf: dict, *, source: str = "config.json", param_dtype: str = "float32") -> Qwen2Config:
    """Translate an HF Qwen2 config.json dict; `source` names the file in error messages."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{source}: model_type={model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2ForCausalLM: DeepSeek-R1-Distill-Qwen, RRM)"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; Qwen2 uses 'silu'")
    if hf.get("use_sliding_window"):
        raise UserError(f"{source}: use_sliding_window=true is not supported; set it to false (full attention)")
    num_heads = _require(hf, "num_attention_heads", source)
    return Qwen2Config(
        vocab_size=_require(hf, "vocab_size", source),
        hidden_size=_require(hf, "hidden_size", source),
        intermediate_size=_require(hf, "intermediate_size", source),
        num_layers=_require(hf, "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim"),
        rope_theta=_rope_theta(hf, source),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        param_dtype=param_dtype,
        dtype=param_dtype,
    )


def config_to_hf(config: Qwen2Config) -> dict:
    """config.json for Qwen2ForCausalLM. rope_theta is written in both spellings so transformers 4.x
    (top-level key) and 5.x (rope_parameters) read the same value."""
    c = config
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.to_dict()["eos_token_id"],  # a list, as HF writes it
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": c.num_layers,
        "use_cache": True,
        "initializer_range": 0.02,
        "dtype": c.param_dtype,
    }


def generation_config_to_hf(config: Qwen2Config) -> dict:
    """A minimal generation_config.json (used when the source carried none)."""
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.to_dict()["eos_token_id"]}


# ----------------------------------------------------------------------------------------------
# HF tensors


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One HF tensor of a concrete config: its name and shape, and where it lives in our state."""

    name: str
    weight: Weight  # the parameter it is (a layer of)
    layer: int | None  # index into the stacked [L] axis, None for unstacked parameters
    ours_shape: tuple[int, ...]  # our shape of this tensor (one layer's slice for stacked parameters)

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.ours_shape
        if self.weight.hf_layout == "linear":
            k = self.weight.hf_in_dims
            return (math.prod(s[k:]), math.prod(s[:k]))
        if self.weight.hf_layout == "flat":
            return (math.prod(s),)
        return s

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        """Whole HF tensor -> our layout (a view where possible)."""
        return (x.T if self.weight.hf_layout == "linear" else x).reshape(self.ours_shape)

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        """Our layout -> whole HF tensor (a view where possible)."""
        if self.weight.hf_layout == "linear":
            rows, cols = self.shape
            return y.reshape(cols, rows).T
        return y.reshape(self.shape)

    # Unstacked tensors (embedding, lm_head, final norm) are streamed as blocks of HF rows. HF rows are
    # our first axis ("same" layout) or our last axis ("linear", transposed); a block converts by a
    # plain transpose (or nothing), which is its own inverse.
    def row_axis(self) -> int:
        return len(self.ours_shape) - 1 if self.weight.hf_layout == "linear" else 0

    def rows_index(self, r0: int, r1: int) -> tuple[slice, ...]:
        """Index into our parameter of HF rows r0:r1."""
        return (slice(None),) * self.row_axis() + (slice(r0, r1),)

    def swap_rows_layout(self, x: np.ndarray) -> np.ndarray:
        """A block of HF rows <-> the same block in our layout."""
        return x.T if self.weight.hf_layout == "linear" else x


def hf_tensors(config: Qwen2Config) -> list[HFTensor]:
    """Every HF tensor of this config, in the order HF folders store them (layer by layer)."""
    present = weights(config)
    out = [HFTensor(w.hf_name, w, None, w.shape(config)) for w in present if w.path == "embed"]
    for i in range(config.num_layers):
        out += [HFTensor(w.hf_name.format(i=i), w, i, w.shape(config)[1:]) for w in present if w.stacked]
    out += [HFTensor(w.hf_name, w, None, w.shape(config)) for w in present if w.path in ("final_norm", "lm_head")]
    return out


def _row_ranges(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def block_indices(config: Qwen2Config, path: str, itemsize: int) -> list[tuple[slice, ...]]:
    """How parameter `path` is streamed: one index per block, one layer each for stacked parameters,
    HF-row blocks of at most BLOCK_BYTES for the others. The first block has the largest shape."""
    shape = param_shapes(config)[path]
    if path.startswith("layers."):
        return [(slice(i, i + 1),) for i in range(shape[0])]
    t = next(t for t in hf_tensors(config) if t.weight.path == path)
    rows, cols = t.shape[0], math.prod(t.shape[1:])
    return [t.rows_index(r0, r1) for r0, r1 in _row_ranges(rows, cols * itemsize)]


# ----------------------------------------------------------------------------------------------
# Reading HF folders


def _folder_problem(path: Path) -> str | None:
    """Why `path` is not a readable HF folder, or None."""
    if not path.exists():
        return f"{path} does not exist"
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            return f"{path} is a pickle file; only safetensors weights are read (pickles can run code when loaded)"
        return f"{path} is a file; pass the Hugging Face model folder that holds it"
    if not (path / "config.json").is_file():
        return f"no config.json in {path}; a Hugging Face model folder needs one"
    if (path / SAFETENSORS_INDEX).is_file() or (path / SAFETENSORS_FILE).is_file():
        return None
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return (
            f"{path} holds {pickles[0]}, a pickle; only safetensors weights are read "
            f"(re-save the model with safe_serialization=True)"
        )
    return f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {path}"


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def check_hf_folder(path: Path) -> None:
    problem = _folder_problem(Path(path))
    if problem:
        raise UserError(problem)


def read_json(path: Path, what: str = "") -> dict:
    try:
        with storage.as_path(path).open() as f:
            value = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON{what}: {e}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} must hold a JSON object{what}")
    return value


def read_hf_config(folder: Path, *, param_dtype: str = "float32") -> Qwen2Config:
    path = storage.as_path(folder) / "config.json"
    return config_from_hf(read_json(path), source=str(path), param_dtype=param_dtype)


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(file: Path) -> dict[str, _Entry]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"truncated safetensors file {file}: {size} bytes, shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise UserError(
                f"corrupt or truncated safetensors file {file}: header length {n} does not fit in its {size} bytes"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt safetensors file {file}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"corrupt safetensors file {file}: header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {}
    data_start = 8 + n
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"corrupt safetensors file {file}: bad header entry for tensor {name}") from None
        if dtype_name not in _ST_TO_NUMPY:
            raise UserError(f"tensor {name} in {file} has dtype {dtype_name}; only {', '.join(_ST_TO_NUMPY)} are read")
        dtype = _ST_TO_NUMPY[dtype_name]
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise UserError(
                f"corrupt safetensors file {file}: tensor {name} has {end - begin} bytes "
                f"for shape {list(shape)} {dtype_name}"
            )
        if data_start + end > size:
            raise UserError(
                f"truncated safetensors file {file}: tensor {name} ends at byte {data_start + end} "
                f"but the file has {size} bytes"
            )
        entries[name] = _Entry(file, dtype, shape, data_start + begin, data_start + end)
    return entries


def _check_shard_name(file: object, tensor: str, index: Path) -> None:
    """A shard is a file of the model's own folder: a path elsewhere ('../x', '/x') would read any file."""
    if not isinstance(file, str) or file in ("", ".", "..") or file != Path(file).name or "\\" in file:
        raise UserError(
            f"{index}: tensor {tensor} is mapped to {file!r}; shards must be plain file names in "
            f"the same folder (like 'model-00001-of-00002.safetensors')"
        )


class SafetensorsFolder:
    """The tensors of an HF folder (one model.safetensors, or shards named by model.safetensors.index.json).
    Opening validates every header and file size; `read` then reads exactly the requested bytes."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        check_hf_folder(folder)
        index = folder / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} has no 'weight_map' object")
            for name, file in weight_map.items():
                _check_shard_name(file, name, index)
            files = sorted(set(weight_map.values()))
        else:
            weight_map, files = None, [SAFETENSORS_FILE]
        self.entries: dict[str, _Entry] = {}
        for name in files:
            file = folder / name
            if not file.is_file():
                raise UserError(f"{file} is listed in {index} but does not exist")
            self.entries.update(_read_header(file))
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self.entries:
                    raise UserError(f"tensor {name} is listed in {index} but missing from {folder / file}")
        self._fds: dict[Path, int] = {}

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name].dtype

    def check(self, tensors: Iterable[HFTensor], config_path: Path) -> None:
        """Every tensor the config needs is present with the shape it implies."""
        for t in tensors:
            e = self.entries.get(t.name)
            if e is None:
                raise UserError(f"tensor {t.name} is missing from the safetensors files; {config_path} needs it")
            if e.shape != t.shape:
                raise UserError(
                    f"tensor {t.name} in {e.file} has shape {list(e.shape)} but {config_path} implies {list(t.shape)}"
                )

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or rows r0:r1 of its first axis) as a fresh array in its stored dtype."""
        e = self.entries[name]
        r0, r1 = rows if rows is not None else (0, e.shape[0])
        row_bytes = math.prod(e.shape[1:]) * e.dtype.itemsize
        out = np.empty((r1 - r0,) + e.shape[1:], e.dtype)
        fd = self._fds.get(e.file)
        if fd is None:
            fd = self._fds[e.file] = os.open(e.file, os.O_RDONLY)
        view, offset = memoryview(out.reshape(-1).view(np.uint8)), e.start + r0 * row_bytes
        while view.nbytes:
            n = os.preadv(fd, [view], offset)
            if n == 0:
                raise UserError(f"truncated safetensors file {e.file}: tensor {name} ends early")
            view, offset = view[n:], offset + n
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def default_param_dtype(stored: np.dtype) -> str:
    """The parameter dtype a conversion keeps when none is asked for: the stored one (float16 widens
    to float32, which is exact)."""
    return "bfloat16" if stored == _ST_TO_NUMPY["BF16"] else "float32"


def normalize_index(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A tuple of slices (one per axis, explicit bounds) from a possibly shorter tuple of slices."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def region_shape(index: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in normalize_index(index, shape))


class HFParams:
    """Our parameters, read region by region from an HF folder: nothing is loaded until asked for.

    Opening checks the folder, config.json and every safetensors header (missing tensors, shapes,
    truncated files), so a bad folder fails before any output exists."""

    def __init__(self, folder: Path, *, dtype: str | None = None):
        self.folder = Path(folder)
        self.files = SafetensorsFolder(self.folder)
        config_path = self.folder / "config.json"
        hf_config = read_json(config_path)
        embed = BY_PATH["embed"].hf_name
        stored = self.files.dtype(embed) if embed in self.files.entries else _ST_TO_NUMPY["F32"]
        self.config = config_from_hf(
            hf_config, source=str(config_path), param_dtype=dtype or default_param_dtype(stored)
        )
        self.tensors = hf_tensors(self.config)
        self.files.check(self.tensors, config_path)
        self.shapes = param_shapes(self.config)
        self.dtype = np.dtype(ml_dtypes.bfloat16 if self.config.param_dtype == "bfloat16" else np.float32)
        self._by_path: dict[str, list[HFTensor]] = {}
        for t in self.tensors:
            self._by_path.setdefault(t.weight.path, []).append(t)

    def region(self, path: str, index: tuple) -> np.ndarray:
        """param[index] of our parameter `path` (index: a tuple of step-1 slices), in the config's dtype."""
        shape = self.shapes[path]
        index = normalize_index(index, shape)
        out = np.empty(region_shape(index, shape), self.dtype)
        tensors = self._by_path[path]
        if path.startswith("layers."):
            for k, layer in enumerate(range(index[0].start, index[0].stop)):
                out[k] = tensors[layer].to_ours(self.files.read(tensors[layer].name))[index[1:]]
        else:
            t = tensors[0]
            axis = t.row_axis()
            rows = index[axis]
            block = t.swap_rows_layout(self.files.read(t.name, (rows.start, rows.stop)))
            out[...] = block[index[:axis] + (slice(None),) + index[axis + 1 :]]
        return out

    def close(self) -> None:
        self.files.close()


# ----------------------------------------------------------------------------------------------
# Writing HF folders


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units like transformers; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise UserError(f"size {text!r} is not valid; use a number with a unit such as 500MB, 5GB or 2GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def _plan_shards(tensors: list[tuple[str, np.dtype, tuple[int, ...]]], max_shard_size: int) -> list[list[int]]:
    """Greedy in storage order, like transformers: a new shard starts when the next tensor would overflow
    the current one (a single tensor larger than the limit gets a shard of its own)."""
    shards, size = [[]], 0
    for i, (_, dtype, shape) in enumerate(tensors):
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _header_bytes(entries: list[tuple[str, np.dtype, tuple[int, ...]]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NUMPY_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors_folder(
    out_dir: Path,
    tensors: list[tuple[str, np.dtype, tuple[int, ...]]],
    blocks: Callable[[int], Iterator[np.ndarray]],
    *,
    max_shard_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write `tensors` (name, dtype, shape) into `out_dir` as model.safetensors, or as
    model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json when they exceed
    `max_shard_size` bytes. `blocks(i)` yields tensor i's data as consecutive row blocks, so only one
    block is in memory at a time. Returns the written file names."""
    shards = _plan_shards(tensors, max_shard_size)
    names = (
        [SAFETENSORS_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    for file_name, members in zip(names, shards):
        entries = [tensors[i] for i in members]
        with (out_dir / file_name).open("wb") as f:
            f.write(_header_bytes(entries))
            for i, (name, dtype, shape) in zip(members, entries):
                written = 0
                for block in blocks(i):
                    if block.dtype != dtype:
                        raise AssertionError(f"{name}: block dtype {block.dtype} != {dtype}")
                    f.write(np.ascontiguousarray(block).reshape(-1).view(np.uint8).data)
                    written += block.nbytes
                if written != math.prod(shape) * dtype.itemsize:
                    raise AssertionError(f"{name}: wrote {written} bytes for shape {shape}")
                weight_map[name] = file_name
                if progress:
                    progress(1)
    if len(shards) > 1:
        total = sum(math.prod(s) * d.itemsize for _, d, s in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_hf_folder(
    out_dir: Path,
    config: Qwen2Config,
    region: Callable[[str, tuple[slice, ...]], np.ndarray],
    *,
    dtype: np.dtype,
    max_shard_size: int,
    assets_from: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write a complete HF folder (config.json, generation_config.json, safetensors, assets) into the
    existing `out_dir`, config.json last: written in place (on a bucket) and cut short, it is not
    taken for a model folder. `region(path, index)` returns param[index] of our parameter `path` as a
    numpy array of `dtype`; it is asked for one layer or one row block at a time."""
    tensors = hf_tensors(config)
    dtype = np.dtype(dtype)
    specs = [(t.name, dtype, t.shape) for t in tensors]

    def blocks(i: int) -> Iterator[np.ndarray]:
        t = tensors[i]
        if t.layer is not None:
            yield np.ascontiguousarray(t.to_hf(region(t.weight.path, (slice(t.layer, t.layer + 1),))[0]))
            return
        row_bytes = math.prod(t.shape[1:]) * dtype.itemsize
        for r0, r1 in _row_ranges(t.shape[0], row_bytes):
            yield np.ascontiguousarray(t.swap_rows_layout(region(t.weight.path, t.rows_index(r0, r1))))

    write_safetensors_folder(out_dir, specs, blocks, max_shard_size=max_shard_size, progress=progress)
    copied = copy_assets(assets_from, out_dir) if assets_from is not None else []
    if "generation_config.json" not in copied:
        write_json(out_dir / "generation_config.json", generation_config_to_hf(config))
    write_json(out_dir / "config.json", config_to_hf(config))


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def copy_assets(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer / generation files that `src` has into `dst`; returns their names."""
    src, dst = storage.as_path(src), storage.as_path(dst)
    copied = []
    for name in ASSET_FILES:
        if (src / name).is_file():
            storage.copy_file(src / name, dst / name)
            copied.append(name)
    return copied


def has_tokenizer(folder: Path) -> bool:
    return any((storage.as_path(folder) / name).is_file() for name in TOKENIZER_FILES)
