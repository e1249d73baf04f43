"""Output shapes for kernel calls that also work inside `jax.shard_map`."""

from __future__ import annotations

import jax


def out_struct(like: jax.Array, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    """`ShapeDtypeStruct(shape, dtype)` that varies over the mesh axes `like` varies over.

    Under `shard_map(check_vma=True)` a kernel's outputs must say how they vary across the
    manual mesh axes; they vary as their main input does. Outside `shard_map` this is plain.
    """
    mat = jax.typeof(like).manual_axis_type
    return jax.ShapeDtypeStruct(shape, dtype, **({} if mat.empty else {"manual_axis_type": mat}))
