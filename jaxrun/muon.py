"""Muon (momentum orthogonalized by Newton–Schulz) as optax transforms.

Weights are stored ``[..., fan_in, fan_out]`` and used as ``x @ W``; every
leading axis (the stacked layer axis ``L``, a bank of matrices) is a batch
axis, so each matrix is orthogonalized on its own. ``scale_by_muon`` does the
speedrun's momentum, a Newton–Schulz polar step in bf16 and a shape or NorMuon
rescaling; ``muon`` adds decoupled or cautious weight decay and the learning
rate. Nothing here mixes matrices, so the update also runs unchanged on a
slice of the leading axes inside ``jax.shard_map``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class NSCoefficients(NamedTuple):
    """A Newton–Schulz schedule: one ``(a, b, c)`` per iteration.

    Each iteration maps ``X -> a X + (b A + c A²) X`` with ``A = X Xᵀ``, i.e.
    every singular value ``s -> a s + b s³ + c s⁵``. The input is first divided
    by ``‖X‖_F · safety``, so all singular values start in ``(0, 1/safety]``.
    """

    coeffs: tuple[tuple[float, float, float], ...]
    safety: float


NS_PRESETS: dict[str, NSCoefficients] = {
    # train_gpt_simple.py: fixed point at 1 with zero slope there, slope 2 at 0;
    # twelve steps converge tightly.
    "simple": NSCoefficients(coeffs=((2.0, -1.5, 0.5),) * 12, safety=1.0),
    # The original Muon quintic (@KellerJordan, 2024): steepest slope at 0, so
    # singular values land roughly in [0.7, 1.2] instead of at 1.
    "quintic": NSCoefficients(coeffs=((3.4445, -4.7750, 2.0315),) * 5, safety=1.0),
    # Polar Express (Amsel et al. 2025) for 5 steps, safety 2e-2, cushion 2, as
    # modded-nanogpt uses it from record #38 on.
    "polar_express": NSCoefficients(
        coeffs=(
            (8.156554524902461, -22.48329292557795, 15.878769915207462),
            (4.042929935166739, -2.808917465908714, 0.5000178451051316),
            (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
            (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
            (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
        ),
        safety=1.02,
    ),
}

_NS_IMPLS = ("xla", "pallas")
_SCALINGS = ("shape", "normuon")
_WEIGHT_DECAY_MODES = ("decoupled", "cautious")


def _normalized(x, coeffs, eps, dtype, round_first):
    """``x / (‖x‖_F · safety + eps)`` per matrix, in `dtype`."""
    # The norm comes from the fp32 values (or from their `dtype` rounding); only
    # the iteration runs in `dtype`.
    x32 = (x.astype(dtype) if round_first else x).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(-2, -1), keepdims=True))
    return (x32 / (norm * coeffs.safety + eps)).astype(dtype)


def newton_schulz(
    x: jax.Array,
    coeffs: NSCoefficients,
    eps: float = 1e-7,
    *,
    dtype: jnp.dtype = jnp.bfloat16,
    round_first: bool = False,
    impl: str = "xla",
) -> jax.Array:
    """Approximates the polar factor ``U Vᵀ`` of each matrix in ``x``.

    The Gram matrix is taken on the small side: tall matrices are transposed
    first (``impl="xla"``), or iterate as ``X -> a X + X (b A + c A²)`` with
    ``A = Xᵀ X`` (``impl="pallas"``, as record #77 does). Leading axes are
    batch axes of batched matmuls; no two matrices interact.

    Args:
      x: ``[..., m, n]`` array; the last two axes are the matrix.
      coeffs: the iteration schedule, e.g. ``NS_PRESETS["polar_express"]``.
      eps: added to ``‖X‖_F · safety`` before dividing. modded-nanogpt uses
        1e-7 with the simple and quintic schedules, 1e-6 with Polar Express.
      dtype: the dtype of the iteration: bf16 as in the speedrun, or float32
        (matmuls at ``Precision.HIGHEST``) for reference checks.
      round_first: round ``x`` to ``dtype`` before taking its norm and
        dividing, as record #77's ``polar_express`` does (it casts the
        momentum to bf16 first); otherwise the norm comes from the fp32
        values and ``x`` is rounded once, after the division.
      impl: ``"xla"``: every product is an XLA matmul. ``"pallas"``: the two
        symmetric products (``A`` and ``b A + c A²``) are Pallas kernels that
        compute one triangle and mirror it (``pallas_kernels.symmetric_mm``),
        interpreted off GPU; the last product stays an XLA matmul. Both round
        the same intermediates to ``dtype``; they differ only in fp32
        summation order.

    Returns:
      An array with the shape and dtype of ``x``.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a [..., m, n] array, got shape {x.shape}")
    if impl not in _NS_IMPLS:
        raise ValueError(f"impl must be one of {_NS_IMPLS}, got {impl!r}")
    tall = x.shape[-2] > x.shape[-1]
    if impl == "pallas":
        return _newton_schulz_pallas(x, coeffs, eps, dtype, round_first, tall)
    y = _normalized(jnp.swapaxes(x, -1, -2) if tall else x, coeffs, eps, dtype, round_first)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def mm(u, v):
        # fp32 accumulation, and the axpy around each product in fp32 too, so
        # every step rounds to `dtype` once (as torch's addmm/baddbmm do).
        return jnp.matmul(u, v, precision=precision, preferred_element_type=jnp.float32)

    for a, b, c in coeffs.coeffs:
        gram = mm(y, jnp.swapaxes(y, -1, -2)).astype(dtype)
        poly = (b * gram.astype(jnp.float32) + c * mm(gram, gram)).astype(dtype)
        y = (a * y.astype(jnp.float32) + mm(poly, y)).astype(dtype)
    if tall:
        y = jnp.swapaxes(y, -1, -2)
    return y.astype(x.dtype)


def _newton_schulz_pallas(x, coeffs, eps, dtype, round_first, tall):
    """``newton_schulz`` with the symmetric products as Pallas kernels; tall matrices stay tall."""
    from pallas_kernels import symmetric_mm

    interpret = jax.default_backend() != "gpu"
    gram_of = symmetric_mm.xtx if tall else symmetric_mm.xxt
    y = _normalized(x, coeffs, eps, dtype, round_first)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    for a, b, c in coeffs.coeffs:
        gram = gram_of(y, interpret=interpret)
        poly = symmetric_mm.ba_plus_caa(gram, b, c, interpret=interpret)
        # X·poly for tall X: the transpose of poly·Xᵀ, as poly is symmetric.
        product = (y, poly) if tall else (poly, y)
        step = jnp.matmul(*product, precision=precision, preferred_element_type=jnp.float32)
        y = (a * y.astype(jnp.float32) + step).astype(dtype)
    return y.astype(x.dtype)


class MuonState(NamedTuple):
    """State of ``scale_by_muon``.

    ``second_moment`` holds NorMuon's fp32 row or column statistics, or is an
    ``optax.MaskedNode()`` (no leaves) when the scaling is ``"shape"``.
    """

    count: jax.Array  # int32 scalar: updates done so far
    momentum: optax.Updates
    second_moment: optax.Updates


def shape_scale(shape: tuple[int, ...]) -> float:
    """``sqrt(max(1, fan_out / fan_in))`` for a ``[..., fan_in, fan_out]`` weight."""
    fan_in, fan_out = shape[-2], shape[-1]
    return max(1.0, fan_out / fan_in) ** 0.5


def normuon_reduce_axis(shape: tuple[int, ...]) -> int:
    """The axis NorMuon averages over: the shorter one, ``fan_in`` when square."""
    # Keeps one statistic per unit of the longer axis (per output unit when
    # square): the grouping modded-nanogpt's red_dim rule gives on its banks.
    return -2 if shape[-1] >= shape[-2] else -1


def _normuon_zeros(p: jax.Array) -> jax.Array:
    shape = list(p.shape)
    shape[normuon_reduce_axis(p.shape)] = 1
    return jnp.zeros(shape, jnp.float32)


def _normuon(o: jax.Array, nu: jax.Array, b2: float) -> tuple[jax.Array, jax.Array]:
    """Row/column second-moment normalization that keeps each ``‖o‖_F``."""
    axis = normuon_reduce_axis(o.shape)
    o32 = o.astype(jnp.float32)
    mean_sq = jnp.mean(jnp.square(o32), axis=axis, keepdims=True)
    nu = nu + (1.0 - b2) * (mean_sq - nu)
    inv_rms = jax.lax.rsqrt(jnp.maximum(nu, 1e-10))
    # inv_rms is constant along `axis`, so both norms follow from mean_sq.
    size = o.shape[axis]
    old_sq = size * jnp.sum(mean_sq, axis=(-2, -1), keepdims=True)
    new_sq = size * jnp.sum(mean_sq * jnp.square(inv_rms), axis=(-2, -1), keepdims=True)
    scale = inv_rms * (jnp.sqrt(old_sq) / jnp.maximum(jnp.sqrt(new_sq), 1e-10))
    return (o32 * scale).astype(o.dtype), nu


def _check_matrices(tree: optax.Params) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if leaf.ndim < 2:
            name = jax.tree_util.keystr(path)
            raise ValueError(f"Muon needs [..., fan_in, fan_out] leaves; {name} has shape {leaf.shape}")


def scale_by_muon(
    *,
    momentum: float | optax.Schedule = 0.95,
    nesterov: bool = True,
    ns: str | NSCoefficients = "simple",
    scaling: str = "shape",
    normuon_b2: float = 0.9,
    eps: float = 1e-7,
    ns_dtype: jnp.dtype = jnp.bfloat16,
    ns_round_first: bool = False,
    ns_impl: str = "xla",
    shape_factor: bool = True,
) -> optax.GradientTransformation:
    """Momentum, then orthogonalization, then shape or NorMuon scaling.

    With ``β`` the momentum at the current count, the buffer moves
    ``m <- m + (1 - β)(g - m)`` and the direction orthogonalized is
    ``g + β(m - g)`` (Nesterov) or ``m``. There is no bias correction: this is
    the speedrun's form, not ``optax.contrib.scale_by_muon``'s.

    Every leaf must be ``[..., fan_in, fan_out]``. Nothing mixes the matrices
    of the leading axes, so ``update_fn`` gives the same result on any slice
    of them (one device's layers inside ``jax.shard_map``) as on the whole
    stack.

    Args:
      momentum: ``β``, or a schedule of the update count (warmup 0.85 -> 0.95,
        cooldown). A schedule is evaluated inside the traced update, so
        changing values never recompile.
      nesterov: orthogonalize ``g + β(m - g)`` rather than ``m``.
      ns: a key of ``NS_PRESETS`` or an ``NSCoefficients``.
      scaling: ``"shape"`` multiplies by ``sqrt(max(1, fan_out / fan_in))``,
        which is torch's ``sqrt(max(1, rows / cols))`` on ``[out, in]``
        weights. ``"normuon"`` first divides each row or column by the root
        of an EMA (rate ``normuon_b2``, zero init, no bias correction) of its
        mean square, rescales each matrix back to the Frobenius norm it had,
        then applies the same shape factor. Statistics are kept per unit of
        the longer axis, per output unit when square: ``[..., 1, fan_out]``
        if ``fan_out >= fan_in``, else ``[..., fan_in, 1]``.
      normuon_b2: NorMuon's EMA rate. Record #77 (2026-03-06) uses 0.95.
      eps: added to the Frobenius norm before Newton–Schulz.
      ns_dtype: the Newton–Schulz dtype; bf16 except in reference checks.
      ns_round_first: passed to ``newton_schulz`` as ``round_first``.
      ns_impl: passed to ``newton_schulz`` as ``impl``: ``"xla"`` or ``"pallas"``.
      shape_factor: multiply by ``sqrt(max(1, fan_out / fan_in))``. Off when
        the caller scales each leaf itself (record #77's param table gives
        ``w_down`` [F, D] the same factor 2 as ``w_up`` [D, F]).

    Returns:
      An ``optax.GradientTransformation`` whose state is a ``MuonState``.

    References:
      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024

      Amsel et al., `The Polar Express: Optimal Matrix Sign Methods and Their
      Application to the Muon Algorithm <https://arxiv.org/abs/2505.16932>`_,
      2025

      Li et al., `NorMuon: Making Muon more efficient and scalable
      <https://arxiv.org/abs/2510.05491>`_, 2025
    """
    coeffs = NS_PRESETS[ns] if isinstance(ns, str) else ns
    if scaling not in _SCALINGS:
        raise ValueError(f"scaling must be one of {_SCALINGS}, got {scaling!r}")
    if ns_impl not in _NS_IMPLS:
        raise ValueError(f"ns_impl must be one of {_NS_IMPLS}, got {ns_impl!r}")
    use_normuon = scaling == "normuon"

    def init_fn(params):
        _check_matrices(params)
        if use_normuon:
            second_moment = jax.tree.map(_normuon_zeros, params)
        else:
            second_moment = optax.MaskedNode()
        return MuonState(
            count=jnp.zeros([], jnp.int32),
            momentum=optax.tree.zeros_like(params),
            second_moment=second_moment,
        )

    def leaf_update(g, m, nu, beta):
        g32, m32 = g.astype(jnp.float32), m.astype(jnp.float32)
        m32 = m32 + (1.0 - beta) * (g32 - m32)
        u = g32 + beta * (m32 - g32) if nesterov else m32
        o = newton_schulz(u, coeffs, eps, dtype=ns_dtype, round_first=ns_round_first, impl=ns_impl)
        if use_normuon:
            o, nu = _normuon(o, nu, normuon_b2)
        if shape_factor:
            o = o * shape_scale(g.shape)
        return o.astype(g.dtype), m32.astype(m.dtype), nu

    def update_fn(updates, state, params=None):
        del params
        beta = momentum(state.count) if callable(momentum) else momentum
        beta = jnp.asarray(beta, jnp.float32)
        grads, treedef = jax.tree.flatten(updates)
        if not grads:
            return updates, state._replace(count=optax.safe_increment(state.count))
        moms = treedef.flatten_up_to(state.momentum)
        nus = treedef.flatten_up_to(state.second_moment) if use_normuon else [None] * len(grads)
        out = [leaf_update(g, m, nu, beta) for g, m, nu in zip(grads, moms, nus, strict=True)]
        new_updates, new_moms, new_nus = (treedef.unflatten(list(col)) for col in zip(*out, strict=True))
        new_state = MuonState(
            count=optax.safe_increment(state.count),
            momentum=new_moms,
            second_moment=new_nus if use_normuon else state.second_moment,
        )
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def add_cautious_decayed_weights(weight_decay: float | jax.Array) -> optax.GradientTransformation:
    """Adds ``weight_decay · p`` only where ``update · p >= 0``.

    ``update`` is the descent direction before the learning rate (it is then
    subtracted), so decay acts only where the update already pulls ``p``
    toward zero. ``>=`` (decay where the update is zero) follows
    modded-nanogpt's NorMuon step.

    Args:
      weight_decay: decay rate; ``muon`` multiplies it by the learning rate.

    Returns:
      A stateless ``optax.GradientTransformation``; ``update`` needs params.

    References:
      Chen et al., `Cautious Weight Decay <https://arxiv.org/abs/2510.12402>`_,
      2025
    """

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_cautious_decayed_weights needs params")

        def decay(u, p):
            return jnp.where(u * p >= 0, u + weight_decay * p, u).astype(u.dtype)

        return jax.tree.map(decay, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float | jax.Array = 0.0,
    weight_decay_mode: str = "decoupled",
    **scale_by_muon_kwargs,
) -> optax.GradientTransformation:
    """Muon with weight decay and a learning rate, for matrix leaves only.

    The update is ``-lr · (o + wd · p)``, ``o`` from ``scale_by_muon``, with
    decoupled decay (torch's ``p *= 1 - lr·wd``) or cautious decay (only where
    ``o · p >= 0``). The shape factor scales ``o`` but not the decay, as in
    modded-nanogpt. Send other parameters to Adam with ``optax.partition``.

    Args:
      learning_rate: a constant or a schedule of the count.
      weight_decay: decay rate, multiplied by the learning rate.
      weight_decay_mode: ``"decoupled"`` or ``"cautious"``.
      **scale_by_muon_kwargs: passed on to ``scale_by_muon``.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Jordan, `modded-nanogpt: Speedrunning the NanoGPT baseline
      <https://github.com/KellerJordan/modded-nanogpt>`_, 2024
    """
    if weight_decay_mode == "decoupled":
        decay = optax.add_decayed_weights(weight_decay)
    elif weight_decay_mode == "cautious":
        decay = add_cautious_decayed_weights(weight_decay)
    else:
        raise ValueError(f"weight_decay_mode must be one of {_WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
    return optax.chain(
        scale_by_muon(**scale_by_muon_kwargs),
        decay,
        optax.scale_by_learning_rate(learning_rate),
    )
