"""rrm-jax checkpoints: Orbax save / restore of a model, and loading a model from any folder we write.

Layout of an rrm-jax checkpoint (one Orbax composite checkpoint, i.e. one CheckpointManager step):

    CKPT/
      _CHECKPOINT_METADATA     Orbax step metadata
      params/                  Orbax PyTree checkpoint (OCDBT + zarr arrays) of the parameter dict
                               {"embed": [V, D], "layers": {"q_proj": [L, D, N, H], ...}, "final_norm": [D],
                                "lm_head": [D, V] (untied only)} -- exactly `model.params()`
      model_config/metadata    Qwen2Config.to_dict() as JSON (Orbax JsonCheckpointHandler item)
      assets/                  optional: tokenizer files and generation_config.json copied verbatim

The trainer's CheckpointManager writes OUTPUT_DIR/<step>/ with the same `params` and `model_config`
items (take them from `model_items(model)`) next to its own (optimizer state, data iterator), so every
step directory is an rrm-jax checkpoint. `load_model` accepts an HF folder, a checkpoint, or a
CheckpointManager directory (OUTPUT_DIR or OUTPUT_DIR/checkpoints: the latest step is used).

Streaming: a conversion never holds a whole stacked parameter on the host. `StreamedArray` leaves are
written by `_StreamedArrayHandler`, an Orbax TypeHandler that creates the array with the spec Orbax
itself would build, chunked one block (one layer / one row block) per chunk, and writes block by
block; Orbax writes all metadata, so the standard NumpyHandler / ArrayHandler restore it unchanged.
`open_param_arrays` gives TensorStore handles for reading it back block by block. (A trainer's
checkpoint is chunked by device shard instead; it reads back the same, one chunk at a time.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

# Orbax's own spec builder and commit future, so streamed arrays are stored exactly as its NumpyHandler
# stores numpy arrays (internal modules: orbax-checkpoint is pinned in setup.py).
from orbax.checkpoint._src.futures import future as ocp_future
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from rrm_jax import parallel, storage
from rrm_jax.errors import UserError
from rrm_jax.model import hf
from rrm_jax.model.config import Qwen2Config, dtype_name
from rrm_jax.model.qwen2 import LOGICAL_AXES, Qwen2, param_shapes

PARAMS_ITEM = "params"
CONFIG_ITEM = "model_config"
ASSETS_DIR = "assets"
COMMIT_FILE = "commit_success.txt"  # Orbax's mark of a checkpoint committed without a rename
_CONFIG_FILE = "metadata"  # JsonCheckpointHandler's file name inside the model_config item


# ----------------------------------------------------------------------------------------------
# Nested parameter dicts <-> flat state paths ("layers.q_proj")


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ----------------------------------------------------------------------------------------------
# Writing: atomic output folders, streamed arrays


def check_output_free(out: Path | str) -> None:
    """Outputs never overwrite anything: `out` must not exist (an empty folder is fine)."""
    out = storage.as_path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists; choose a new path or remove it")


def orbax_path(path: Path | str) -> epath.Path:
    """`path` as Orbax takes it: absolute (it refuses relative paths), a bucket path as it is."""
    return epath.Path(str(path)) if storage.is_bucket(path) else epath.Path(Path(path).absolute())


def atomicity_options(path: Path | str) -> ocp.options.AtomicityOptions | None:
    """How Orbax commits a checkpoint under `path`: by renaming its folder (Orbax's default for a local
    path), or where folders are not renamed (a bucket) by writing commit_success.txt in place."""
    if storage.renames_folders(path):
        return None
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


@contextlib.contextmanager
def staged_output_dir(out: Path | str) -> Iterator[Path]:
    """Yields a not-yet-existing path in a temp folder beside `out`; on success it is renamed to `out`,
    on any error (or Ctrl-C) the temp folder is removed, so no half-written output is ever left.
    Where folders are not renamed (a bucket) it yields `out` itself and removes it on an error; the
    writers mark it complete themselves (Orbax's commit file, an HF folder's config.json written last)."""
    if not storage.renames_folders(out):
        out = storage.as_path(out)
        check_output_free(out)
        if out.exists():
            out.rmdir()  # the empty folder checked above: Orbax creates its own
        try:
            yield out
        except BaseException:
            storage.remove_tree(out)
            raise
        return
    out = Path(out).absolute()  # the stage inside is handed to Orbax, which refuses relative paths
    check_output_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage / out.name
        if out.exists():
            out.rmdir()  # the empty folder checked above
        os.rename(stage / out.name, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class StreamedArray:
    """A checkpoint leaf produced block by block: `blocks()` yields (index, numpy block) pairs that tile
    the whole array, each block of shape `block_shape` (or smaller at the edges)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    block_shape: tuple[int, ...]
    blocks: Callable[[], Iterator[tuple[tuple[slice, ...], np.ndarray]]]


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
    """Saves StreamedArrays exactly as NumpyHandler saves numpy arrays (same spec, same metadata, so
    the standard handlers restore them), except that the chunk shape is the block shape and the data
    is written one block at a time."""

    async def _write(self, values, infos, args):
        for value, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info=info,
                arg=arg,
                global_shape=value.shape,
                local_shape=value.block_shape,
                dtype=value.dtype,
                use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
            )
            array = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
            for index, block in value.blocks():
                await array[index].write(block)

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        return [
            ocp_future.CommitFutureAwaitingContractedSignals(self._write(values, infos, args), name="streamed_array")
        ]


def _save(path: Path, params: dict, config: Qwen2Config, *, streamed: bool) -> None:
    """Orbax composite save of the `params` and `model_config` items into the new folder `path`."""
    registry = ocp.DefaultCheckpointHandlerRegistry()
    if streamed:  # Orbax's own jax.Array handler stays registered: it owns the array-metadata store
        types = ocp.type_handlers.create_type_handler_registry(
            (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)), (StreamedArray, _StreamedArrayHandler())
        )
        registry.add(PARAMS_ITEM, ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler(type_handler_registry=types))
    atomicity = atomicity_options(path)
    handler = ocp.CompositeCheckpointHandler(
        handler_registry=registry, composite_options=ocp.CompositeOptions(atomicity_options=atomicity)
    )
    with ocp.Checkpointer(handler, atomicity_options=atomicity) as ckpt:
        ckpt.save(orbax_path(path), ocp.args.Composite(**model_items_for(params, config)))


def model_items_for(params: dict, config: Qwen2Config) -> dict[str, ocp.args.CheckpointArgs]:
    return {PARAMS_ITEM: ocp.args.PyTreeSave(params), CONFIG_ITEM: ocp.args.JsonSave(config.to_dict())}


def model_items(model: Qwen2) -> dict[str, ocp.args.CheckpointArgs]:
    """The Orbax items that make a CheckpointManager step an rrm-jax checkpoint; the trainer saves
    `ocp.args.Composite(**model_items(model), opt_state=..., ...)`."""
    return model_items_for(model.params(), model.config)


def write_checkpoint(
    out: Path | str, params: dict, config: Qwen2Config, *, assets_from: Path | None = None, streamed: bool = False
) -> Path:
    """Write an rrm-jax checkpoint at `out` (atomically). `params` is the nested parameter dict, of
    arrays or (streamed=True) of StreamedArrays."""
    with staged_output_dir(out) as stage:
        _save(stage, params, config, streamed=streamed)
        if assets_from is not None:
            hf.copy_assets(assets_from, stage / ASSETS_DIR)
    return storage.as_path(out)


def save_checkpoint(model: Qwen2, config: Qwen2Config, out_dir: Path | str, *, assets_from: Path | None = None) -> Path:
    """Save a model as an rrm-jax checkpoint (tokenizer files copied from `assets_from` when given)."""
    return write_checkpoint(out_dir, model.params(), config, assets_from=_assets_dir(assets_from))


# ----------------------------------------------------------------------------------------------
# Finding and reading checkpoints


def is_checkpoint(path: Path) -> bool:
    """A complete rrm-jax checkpoint; where Orbax commits without renaming (a bucket) only once its
    commit file is written."""
    committed = storage.renames_folders(path) or (path / COMMIT_FILE).is_file()
    return committed and (path / PARAMS_ITEM).is_dir() and (path / CONFIG_ITEM / _CONFIG_FILE).is_file()


def latest_step(root: Path) -> Path | None:
    """Latest finalized step of a CheckpointManager folder (Orbax renames a step to its bare number
    only once it is complete; on a bucket it writes the commit file last)."""
    root = storage.as_path(root)
    steps = [p for p in root.iterdir() if re.fullmatch(r"\d+", p.name) and is_checkpoint(p)] if root.is_dir() else []
    return max(steps, key=lambda p: int(p.name), default=None)


def resolve_checkpoint(path: Path | str) -> Path:
    """The checkpoint folder `path` names: itself, or the latest step of a CheckpointManager folder
    (`path` or `path/checkpoints`)."""
    path = storage.as_path(path) if storage.is_bucket(path) else Path(path).absolute()  # Orbax refuses relative paths
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if is_checkpoint(path):
        return path
    for root in (path, path / "checkpoints"):
        step = latest_step(root)
        if step is not None:
            return step
    raise UserError(
        f"{path} is neither a Hugging Face folder (config.json + safetensors) nor an rrm-jax "
        f"checkpoint ({PARAMS_ITEM}/ + {CONFIG_ITEM}/) nor a folder of checkpoint steps"
    )


def read_checkpoint_config(ckpt: Path) -> Qwen2Config:
    return Qwen2Config.from_dict(hf.read_json(ckpt / CONFIG_ITEM / _CONFIG_FILE))


def _check_params_metadata(ckpt: Path, config: Qwen2Config) -> dict[str, Any]:
    """The stored parameters' Orbax metadata by state path, checked against the config."""
    params_dir = ckpt / PARAMS_ITEM
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(orbax_path(params_dir))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"cannot read the Orbax parameters in {params_dir}: {e}") from None
    stored = flatten(dict(metadata.tree))
    for path, shape in param_shapes(config).items():
        if path not in stored:
            raise UserError(
                f"parameter {path} is missing from {params_dir}; {ckpt / CONFIG_ITEM / _CONFIG_FILE} needs it"
            )
        if tuple(stored[path].shape) != shape:
            raise UserError(
                f"parameter {path} in {params_dir} has shape {list(stored[path].shape)} but "
                f"{ckpt / CONFIG_ITEM / _CONFIG_FILE} implies {list(shape)}"
            )
    return stored


def open_param_arrays(ckpt: Path, config: Qwen2Config) -> dict[str, ts.TensorStore]:
    """TensorStore handles on every stored parameter, for reading back region by region."""
    stored = _check_params_metadata(ckpt, config)
    params_dir = orbax_path(ckpt / PARAMS_ITEM)
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(params_dir)
    use_zarr3 = ocp.PyTreeCheckpointHandler().metadata(params_dir).use_zarr3
    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    arrays = {}
    for path in param_shapes(config):
        info = ocp.type_handlers.ParamInfo(
            name=stored[path].name,
            parent_dir=params_dir,
            ts_context=context,
            is_ocdbt_checkpoint=use_ocdbt,
            use_zarr3=use_zarr3,
        )
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        try:
            arrays[path] = ts.open(ts.Spec(spec), open=True, read=True, context=context).result()
        except ValueError as e:
            raise UserError(f"cannot open parameter {path} in {params_dir}: {e}") from None
    return arrays


def read_region(array: ts.TensorStore, index: tuple, what: str) -> np.ndarray:
    try:
        return array[index].read().result()
    except ValueError as e:  # TensorStore reports missing or corrupt chunks as ValueError
        raise UserError(f"cannot read {what}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Models in and out


def _assets_dir(path: Path | str | None) -> Path | None:
    """Where a folder keeps its tokenizer / generation files: an HF folder itself, a checkpoint's assets/."""
    if path is None:
        return None
    path = storage.as_path(path)
    if hf.is_hf_folder(path):
        return path
    return resolve_checkpoint(path) / ASSETS_DIR


def _target_sharding(path: str, shape: tuple[int, ...], mesh):
    if mesh is None:  # this process's own first device: in a multi-process run jax.devices()[0] is process 0's
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return parallel.logical_sharding(LOGICAL_AXES[path], mesh, shape)


def model_from_params(config: Qwen2Config, params: dict) -> Qwen2:
    """A Qwen2 module holding `params` (nested dict of arrays) without initializing random weights."""
    abstract = nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _load_hf(folder: Path, dtype: str | None, mesh) -> tuple[Qwen2, Qwen2Config]:
    source = hf.HFParams(folder, dtype=dtype)
    try:
        arrays = {}
        for path, shape in source.shapes.items():
            # Each device's shard is read straight from the files into its target sharding.
            arrays[path] = jax.make_array_from_callback(
                shape,
                _target_sharding(path, shape, mesh),
                lambda index, path=path: source.region(path, index),
                dtype=source.dtype,
            )
    finally:
        source.close()
    return model_from_params(source.config, nest(arrays)), source.config


def _load_checkpoint(ckpt: Path, dtype: str | None, mesh) -> tuple[Qwen2, Qwen2Config]:
    config = read_checkpoint_config(ckpt)
    if dtype is not None:
        config = config.replace(param_dtype=dtype, dtype=dtype)
    _check_params_metadata(ckpt, config)
    target, restore_args = {}, {}
    for path, shape in param_shapes(config).items():
        sharding = _target_sharding(path, shape, mesh)
        target[path] = jax.ShapeDtypeStruct(shape, config.param_dtype, sharding=sharding)
        restore_args[path] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=config.param_dtype)
    args = ocp.args.PyTreeRestore(item=nest(target), restore_args=nest(restore_args))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        params = checkpointer.restore(orbax_path(ckpt / PARAMS_ITEM), args=args)
    return model_from_params(config, params), config


def load_model(path: Path | str, *, dtype=None, compute_dtype=None, mesh=None) -> tuple[Qwen2, Qwen2Config]:
    """Load a Qwen2 model from an HF folder, an rrm-jax checkpoint or a CheckpointManager folder.

    dtype: parameter dtype (float32 / bfloat16, as "bfloat16", jnp.bfloat16, np.dtype("float32") ...),
    and the compute dtype too unless compute_dtype is given (e.g. float32 master weights with bfloat16
    activations); None keeps the stored one.
    mesh: a (data, fsdp, tp) mesh from rrm_jax.parallel.make_mesh; each parameter is read straight into
    its sharding on it. None puts everything on this process's first device."""
    path = storage.as_path(path)
    dtype = None if dtype is None else dtype_name(dtype, "dtype")
    compute_dtype = None if compute_dtype is None else dtype_name(compute_dtype, "compute_dtype")
    if hf.is_hf_folder(path):
        model, config = _load_hf(path, dtype, mesh)
    else:
        model, config = _load_checkpoint(resolve_checkpoint(path), dtype, mesh)
    if compute_dtype is not None:
        config = config.replace(dtype=compute_dtype)
        model.config = config
    return model, config


def save_hf(
    model: Qwen2,
    config: Qwen2Config,
    out_dir: Path | str,
    *,
    max_shard_size: int | str = "5GB",
    assets_from: Path | str | None = None,
) -> Path:
    """Write `model` as an HF Qwen2ForCausalLM folder (atomically), one layer at a time from the
    device; tokenizer / generation files are copied from `assets_from` (HF folder or checkpoint)."""
    params = flatten(model.params())
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))

    def region(path, index):
        return np.asarray(jax.device_get(params[path][index])).astype(dtype, copy=False)

    with staged_output_dir(out_dir) as stage:
        stage.mkdir(parents=True, exist_ok=True)
        hf.write_hf_folder(
            stage,
            config,
            region,
            dtype=dtype,
            max_shard_size=hf.parse_size(max_shard_size),
            assets_from=_assets_dir(assets_from),
        )
    return storage.as_path(out_dir)


def save_tokenizer(tokenizer, dst: Path) -> None:
    """`tokenizer.save_pretrained` into the new folder `dst`: saved beside it and renamed into place, or
    where folders are not renamed (a bucket) saved in a local temporary folder and copied file by file."""
    if storage.renames_folders(dst):
        stage = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
        tokenizer.save_pretrained(str(stage))
        os.replace(stage, dst)
        return
    with tempfile.TemporaryDirectory() as local:
        tokenizer.save_pretrained(local)
        for file in sorted(Path(local).iterdir()):
            storage.copy_file(file, dst / file.name)


def load_tokenizer(path: Path | str):
    """The transformers tokenizer stored with an HF folder or checkpoint, or None when it has none."""
    folder = _assets_dir(path)
    if folder is None or not hf.has_tokenizer(folder):
        return None
    import transformers  # heavy; only when a tokenizer exists

    if hf.is_hf_folder(folder):
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    # AutoTokenizer picks the tokenizer class partly from the model config; give it the one an HF
    # folder would have, so a checkpoint's tokenizer loads exactly like its exported folder's.
    hf_config = transformers.Qwen2Config.from_dict(hf.config_to_hf(read_checkpoint_config(folder.parent)))
    return transformers.AutoTokenizer.from_pretrained(str(folder), config=hf_config)
