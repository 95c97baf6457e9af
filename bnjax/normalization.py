"""Normalization by given statistics (evaluation) and by batch statistics with its closed-form custom JVP (training)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.layout import Layout
from bnjax.moments import batch_moments


def _re_conj_mul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``re(conj(a) b)``: the real inner product's terms; plain ``a * b`` for real arrays."""
  if jnp.iscomplexobj(a) or jnp.iscomplexobj(b):
    return jnp.real(jnp.conj(a) * b)
  return a * b


def normalize(
  x: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  feature_axes: tuple[int, ...],
  epsilon: float,
  dtype: Any,
) -> jax.Array:
  """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` with given (running) statistics."""
  layout = Layout(x.shape, feature_axes)
  compute = jnp.promote_types(x.dtype, mean.dtype)

  def per_feature(v):
    return layout.expand(layout.per_feature_to_work(jnp.asarray(v).astype(compute)))

  mul = lax.rsqrt(var.astype(compute) + epsilon)
  if scale is not None:
    mul = mul * jnp.asarray(scale).astype(compute)
  y = (layout.to_work(x.astype(compute)) - per_feature(mean)) * per_feature(mul)
  if bias is not None:
    y = y + per_feature(bias)
  return y.reshape(x.shape).astype(dtype)


def normalize_by_batch(
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  layout: Layout,
  epsilon: float,
  *,
  mask: jax.Array | None = None,
  axis_name: str | None = None,
  axis_index_groups: Any = None,
  use_fast_variance: bool = False,
  mask_uniform_axes: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``(y, mean, var, count)``: ``y = scale * xhat + bias`` with ``xhat`` standardized by batch statistics.

  ``x`` and ``mask`` are in ``layout``'s working shape, ``scale``/``bias`` and the per-feature results
  in its per-feature shape (``mask_uniform_axes``: as :func:`~bnjax.moments.batch_moments` has it).
  Differentiation uses the closed form, as a custom JVP so forward and reverse mode both work:

      dy = xhat dscale + dbias + k (dx - E[dx] - xhat re E[conj(xhat) dx]),   k = scale * rsqrt(var + epsilon)

  with ``E`` the (masked, cross-device) batch mean (``conj`` and ``re`` only matter for complex input).
  It is spelled in ``d = x - shift`` (``xhat = (d - mean_d) r``, see :func:`~bnjax.moments.batch_moments`), with
  every per-feature factor applied after a batch mean, so the transpose (the backward pass) needs only
  ``sum(dy)`` and ``sum(dy * d)``, the same two reductions that give the bias and scale gradients, and one
  elementwise pass for ``dx``: three kernels, reading ``x`` and ``dy`` and writing only ``dx``. Autodiff
  through the stable variance's arithmetic would add several more. (An eager ``jax.vjp`` keeps ``d`` and its
  second spelling, below, among its residuals.)
  """
  moments = functools.partial(
    batch_moments,
    layout=layout,
    mask=mask,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    use_fast_variance=use_fast_variance,
    mask_uniform_axes=mask_uniform_axes,
  )
  per_feature = layout.expand

  def batch_mean(v, count):
    if mask is not None:
      v = jnp.where(mask, v, 0.0)
    total = layout.sum(v)
    if axis_name is not None:
      total = lax.psum(total, axis_name, axis_index_groups=axis_index_groups)
    return total / jnp.maximum(count, 1.0)

  def primal(x, scale, bias):
    mean, var, count, center = moments(x)
    r = lax.rsqrt(var + epsilon)
    if mask is not None:
      # A feature with no valid example anywhere has no statistics: its xhat is defined as 0 (y = bias),
      # and, with k = scale * r = 0, no gradient flows to its inputs.
      r = jnp.where(count > 0, r, 0.0)
    if mask is not None:  # padding (even NaN or inf) is replaced before it can reach outputs or gradients
      x = jnp.where(mask, x, 0.0)
    shift, mean_d = (mean, None) if center is None else center
    d = x - per_feature(shift)
    xhat = (d if mean_d is None else d - per_feature(mean_d)) * per_feature(r)
    return xhat * per_feature(scale) + per_feature(bias), mean, var, count, d, mean_d, r, x, shift

  @jax.custom_jvp
  def normalize(x, scale, bias):
    return primal(x, scale, bias)[:4]

  @normalize.defjvp
  def normalize_jvp(primals, tangents):
    (x, scale, bias), (dx, dscale, dbias) = primals, tangents
    y, mean, var, count, d, mean_d, r, x_work, shift = primal(x, scale, bias)
    k = scale * r
    dmean = batch_mean(dx, count)
    # d spelled a second time, equal bit for bit, for dx's term: XLA:CPU writes out a full-size value that one of
    # its library-fused reductions (here sum(d * ct)) shares with another kernel, and reads it back.
    d_again = x_work - per_feature(lax.optimization_barrier(shift))
    xhat_dx = batch_mean(_re_conj_mul(d_again, dx), count)
    if mean_d is not None:  # xhat = (d - mean_d) r
      xhat_dx = xhat_dx - _re_conj_mul(mean_d, dmean)
    xhat_dx = r * xhat_dx
    # Only additions, each per-feature factor (and sign) inside per_feature(...), and d, not xhat: the transpose
    # then reduces exactly sum(ct) and sum(d * ct), which XLA:CPU fuses into its library reductions straight from
    # x and ct (xhat, three per-feature values from x, it wrote out in full and read back: forward and backward at
    # 256x8x8x16 took about 1.2x the time, at 128x56x56x64 1.1x).
    a = r * dscale - k * r * xhat_dx  # d's coefficient, from xhat dscale - k xhat xhat_dx
    b = dbias - k * dmean if mean_d is None else dbias - k * dmean - mean_d * a
    dy = d * per_feature(a) + per_feature(k) * dx + per_feature(b)
    # d E[|x - mean|^2] = 2 re E[conj(x - mean) dx], and x - mean = xhat * sqrt(var + epsilon).
    dvar = 2.0 * xhat_dx * jnp.sqrt(var + epsilon)
    if mask is not None:  # masked outputs are placeholders: no gradient flows through them
      dy = jnp.where(mask, dy, 0.0)
    return (y, mean, var, count), (dy, dmean, dvar, jnp.zeros_like(count))

  return normalize(x, scale, bias)
