"""`rrm-jax convert`: Hugging Face folder <-> rrm-jax checkpoint, streamed block by block.

    rrm-jax convert hf-to-orbax --hf DIR --out DIR [--dtype bfloat16|float32]
    rrm-jax convert orbax-to-hf --ckpt DIR --out DIR [--max-shard-size 5GB]

Both directions hold one block (one layer of one parameter, or at most 64 MiB of an embedding) in host
memory at a time, so converting a 32B model needs little more RAM than its largest tensor.
Everything is validated before anything is written; the output appears only when complete (on a
`gs://` bucket, which cannot rename a folder, it is written in place and marked complete last:
rrm_jax/storage.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rrm_jax import storage
from rrm_jax.errors import UserError
from rrm_jax.model.config import dtype_arg


def hf_to_checkpoint(
    hf_dir: Path | str, out_dir: Path | str, *, dtype: str | None = None, progress: bool = False
) -> Path:
    """Convert an HF Qwen2 folder into an rrm-jax checkpoint. dtype None keeps the stored dtype."""
    from tqdm import tqdm

    from rrm_jax import checkpoint  # heavy (orbax, jax): imported when a conversion runs, not for --help
    from rrm_jax.model import hf

    checkpoint.check_output_free(out_dir)
    source = hf.HFParams(Path(hf_dir), dtype=dtype)
    # Blocks are sized for the wider of the stored and target dtypes.
    itemsize = max([source.dtype.itemsize] + [e.dtype.itemsize for e in source.files.entries.values()])
    indices = {path: hf.block_indices(source.config, path, itemsize) for path in source.shapes}
    bar = tqdm(total=sum(map(len, indices.values())), desc="hf-to-orbax", unit="block", disable=not progress)

    def streamed(path: str):
        def blocks():
            for index in indices[path]:
                yield index, source.region(path, index)
                bar.update(1)

        shape = source.shapes[path]
        return checkpoint.StreamedArray(shape, source.dtype, hf.region_shape(indices[path][0], shape), blocks)

    try:
        params = checkpoint.nest({path: streamed(path) for path in source.shapes})
        checkpoint.write_checkpoint(out_dir, params, source.config, assets_from=source.folder, streamed=True)
    finally:
        bar.close()
        source.close()
    return storage.as_path(out_dir)


def checkpoint_to_hf(
    ckpt_dir: Path | str, out_dir: Path | str, *, max_shard_size: int | str = "5GB", progress: bool = False
) -> Path:
    """Convert an rrm-jax checkpoint (or the latest step of a checkpoint folder) into an HF folder that
    transformers.AutoModelForCausalLM.from_pretrained loads."""
    from tqdm import tqdm

    from rrm_jax import checkpoint
    from rrm_jax.model import hf

    ckpt = checkpoint.resolve_checkpoint(ckpt_dir)
    config = checkpoint.read_checkpoint_config(ckpt)
    arrays = checkpoint.open_param_arrays(ckpt, config)
    dtypes = {np.dtype(a.dtype.numpy_dtype) for a in arrays.values()}
    if len(dtypes) != 1:
        raise UserError(
            f"parameters in {ckpt / checkpoint.PARAMS_ITEM} mix dtypes {sorted(map(str, dtypes))}; "
            f"an HF folder needs one"
        )
    max_bytes = hf.parse_size(max_shard_size)

    def region(path, index):
        return checkpoint.read_region(arrays[path], index, f"parameter {path} of {ckpt}")

    with (
        checkpoint.staged_output_dir(out_dir) as stage,
        tqdm(total=len(hf.hf_tensors(config)), desc="orbax-to-hf", unit="tensor", disable=not progress) as bar,
    ):
        stage.mkdir(parents=True, exist_ok=True)
        hf.write_hf_folder(
            stage,
            config,
            region,
            dtype=dtypes.pop(),
            max_shard_size=max_bytes,
            assets_from=ckpt / checkpoint.ASSETS_DIR,
            progress=bar.update,
        )
    return storage.as_path(out_dir)


def _run_hf_to_orbax(args) -> int:
    storage.check_support(args.out)
    out = hf_to_checkpoint(args.hf, args.out, dtype=args.dtype, progress=True)
    print(f"wrote rrm-jax checkpoint {out}")
    return 0


def _run_orbax_to_hf(args) -> int:
    for path in (args.ckpt, args.out):
        storage.check_support(path)
    out = checkpoint_to_hf(args.ckpt, args.out, max_shard_size=args.max_shard_size, progress=True)
    print(f"wrote Hugging Face folder {out}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="direction", metavar="{hf-to-orbax,orbax-to-hf}", required=True, parser_class=type(parser)
    )
    to_orbax = sub.add_parser("hf-to-orbax", help="Hugging Face folder (safetensors) -> rrm-jax checkpoint")
    to_orbax.add_argument("--hf", required=True, type=Path, help="Hugging Face model folder (local)")
    to_orbax.add_argument("--out", required=True, type=storage.as_path, help="new checkpoint folder")
    to_orbax.add_argument(
        "--dtype",
        type=dtype_arg,
        default=None,
        help="parameter dtype to store, float32 or bfloat16 (default: the stored one; float16 becomes float32)",
    )
    to_orbax.set_defaults(run=_run_hf_to_orbax)
    to_hf = sub.add_parser("orbax-to-hf", help="rrm-jax checkpoint -> Hugging Face folder")
    to_hf.add_argument(
        "--ckpt",
        required=True,
        type=storage.as_path,
        help="rrm-jax checkpoint, or a folder of checkpoint steps (the latest is used)",
    )
    to_hf.add_argument("--out", required=True, type=storage.as_path, help="new Hugging Face folder")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file before sharding with an index")
    to_hf.set_defaults(run=_run_orbax_to_hf)
