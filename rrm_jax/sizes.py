"""Size arithmetic the samplers, the engine and the planner share: compiled shapes come in powers of
two (so calls of varied sizes reuse a few compilations) and in whole multiples of a block or of the
mesh's batch shards."""

from __future__ import annotations


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= n."""
    return -(-n // multiple) * multiple


def batch_shards(mesh) -> int:
    """How many pieces a mesh splits the batch axis into (data x fsdp; 1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
