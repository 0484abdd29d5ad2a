"""Device mesh (data, fsdp, tp) and the one table mapping logical axis names onto it.

Weights are sharded over fsdp (the embedding / hidden dimension) and tp (heads, MLP width, vocab);
activations and the KV cache over (data, fsdp) on the batch and tp on kv heads. Changing the
parallelism strategy means editing `RULES`, nothing else.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rrm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tp")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tp",
    "embed": "fsdp",
    "q_heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "layers": None,
    "norm": None,
    "length": None,
}


def mesh_shape(data: int, fsdp: int, tp: int, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tp) with a -1 (at most one) replaced by what fills `n_devices` (MaxText's convention)."""
    shape = (data, fsdp, tp)
    if any(v < 1 and v != -1 for v in shape) or shape.count(-1) > 1:
        raise UserError(
            f"mesh data={data} fsdp={fsdp} tp={tp}: sizes must be >= 1, with at most one -1 (= all remaining devices)"
        )
    if -1 in shape:
        rest = math.prod(v for v in shape if v != -1)
        if n_devices % rest:
            raise UserError(
                f"mesh data={data} fsdp={fsdp} tp={tp}: the other sizes ({rest}) do not divide the "
                f"{n_devices} devices, so -1 cannot fill them"
            )
        shape = tuple(n_devices // rest if v == -1 else v for v in shape)
    return shape


def make_mesh(data: int = 1, fsdp: int = 1, tp: int = 1, *, devices=None) -> Mesh:
    """A (data, fsdp, tp) mesh over all devices (or `devices`); its size must equal their count, and one
    size may be -1 for all remaining devices (`make_mesh(fsdp=-1)`: fsdp over everything)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(data, fsdp, tp, len(devices))
    data, fsdp, tp = shape
    if math.prod(shape) != len(devices):
        raise UserError(
            f"mesh data={data} fsdp={fsdp} tp={tp} has {math.prod(shape)} slots but there are "
            f"{len(devices)} devices; the product of data*fsdp*tp must equal {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical_axes, mesh: Mesh, shape=None) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes. A dimension that the mesh axes do not
    divide evenly stays replicated (e.g. 2 kv heads on tp=4), so any preset runs on any mesh."""
    spec = []
    used = set()
    for i, name in enumerate(logical_axes):
        target = RULES.get(name)
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def logical_sharding(logical_axes, mesh: Mesh, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, shape))


def param_shardings(model: nnx.Module, mesh: Mesh) -> dict:
    """NamedSharding for every parameter of `model`, as a nested dict matching `model.params()`."""
    shardings: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *parents, name = path
        node = shardings
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = logical_sharding(var.get_metadata()["logical_axes"], mesh, var.get_value().shape)
    return shardings


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every parameter of `model` on `mesh` according to its logical axes (in place)."""
    shardings = param_shardings(model, mesh)
    nnx.update(model, jax.device_put(model.params(), shardings))
    return model
