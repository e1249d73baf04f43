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


def vary_like(like: jax.Array, out: jax.Array) -> jax.Array:
    """`out`, marked as varying over the manual mesh axes `like` varies over.

    For kernel calls whose outputs drop `out_struct`'s axis type (Mosaic GPU's `plgpu.kernel`
    returns invariant outputs); a custom VJP's cotangents must vary as their primals do.
    """
    missing = jax.typeof(like).manual_axis_type.varying - jax.typeof(out).manual_axis_type.varying
    return jax.lax.pcast(out, tuple(sorted(missing)), to="varying") if missing else out
