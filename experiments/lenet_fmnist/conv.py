"""A 2-D 'VALID' convolution with `flax.linen.Conv`'s parameters and several ways to compute it.

XLA's CPU backend runs the small convolutions of LeNet (1 -> 6 and 6 -> 16 channels, 5x5) and above
all their gradients far below what the same arithmetic achieves as a matrix multiply, and LeNet's
channel counts are too small to fill a CPU's vector lanes. So:

* ``"lanes"`` puts the batch on the vector lanes: activations laid out (C, H, W, N). The convolution
  is one matrix product of the kernel, (C_out, k*k*C_in), with the k*k*C_in shifted (H', W', N) planes
  stacked along the leading axis: the stack is k*k contiguous block copies, not im2col's gather that
  interleaves k*k*C_in values per output position, and the product's long axis is H'*W'*N. Its
  gradients are matrix products of the same planes and a sum of shifted planes.
* ``"im2col"`` gathers the k*k shifted windows of NHWC images into a patch matrix (N*H'*W', k*k*C_in)
  and multiplies it by the kernel reshaped to (k*k*C_in, C_out).
* ``"xla"`` is ``lax.conv_general_dilated``, the right choice on GPUs.

``"auto"`` picks ``"lanes"`` on CPU and ``"xla"`` elsewhere. All give the same numbers up to float32
rounding and use the same parameters (``kernel`` HWIO, ``bias``), so checkpoints of this module and of
``flax.linen.Conv(padding='VALID')`` are interchangeable. Every formulation takes either layout
(``"NHWC"``, or ``"CHWN"`` where the batch is last): the others are transposed to and from their own,
so a model gains from ``"lanes"`` when it keeps its activations in ``"CHWN"`` between layers.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

IMPLS = ("auto", "xla", "im2col", "lanes")
LAYOUTS = ("NHWC", "CHWN")
_LECUN_NORMAL = nn.initializers.lecun_normal()  # flax.linen.Conv's default kernel initializer
_NHWC_TO_CHWN = (3, 1, 2, 0)  # (its own inverse)


def resolve_impl(impl: str) -> str:
  """``impl`` with ``"auto"`` replaced by this backend's choice: ``"lanes"`` on CPU, ``"xla"`` elsewhere."""
  if impl not in IMPLS:
    raise ValueError(f"`impl` is {impl!r}, but should be one of {IMPLS}.")
  if impl == "auto":
    return "lanes" if jax.default_backend() == "cpu" else "xla"
  return impl


def native_layout(impl: str) -> str:
  """The layout ``impl`` computes in (``"CHWN"`` for ``"lanes"``, else ``"NHWC"``)."""
  return "CHWN" if resolve_impl(impl) == "lanes" else "NHWC"


def conv2d_valid(
  x: jax.Array, kernel: jax.Array, impl: str = "auto", precision: str | None = None, layout: str = "NHWC"
) -> jax.Array:
  """Stride-1 'VALID' convolution of ``x`` (``layout`` NHWC or CHWN) with an HWIO ``kernel``, in ``x``'s layout.

  ``precision``: jax's name, or None.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"`layout` is {layout!r}, but should be one of {LAYOUTS}.")
  impl = resolve_impl(impl)
  if native_layout(impl) != layout:  # transpose to the formulation's own layout and back
    own = conv2d_valid(jnp.transpose(x, _NHWC_TO_CHWN), kernel, impl, precision, native_layout(impl))
    return jnp.transpose(own, _NHWC_TO_CHWN)
  if impl == "lanes":
    return _conv_planes(x, kernel, precision)
  if impl == "xla":
    return lax.conv_general_dilated(
      x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )
  kh, kw, cin, cout = kernel.shape
  n, h, w, _ = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  # Patch features ordered (kh, kw, cin), matching the HWIO kernel's row-major reshape.
  patches = jnp.concatenate([x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)], axis=-1)
  out = jnp.matmul(
    patches.reshape(n * ho * wo, kh * kw * cin), kernel.reshape(kh * kw * cin, cout), precision=precision
  )
  return out.reshape(n, ho, wo, cout)


def _shifted_planes(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """(kh*kw*C, H', W', N): the CHWN ``x``'s k*k shifted windows stacked along the leading axis, in
  (kh, kw, C) order (the HWIO kernel's row-major order)."""
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return jnp.concatenate([x[:, i : i + ho, j : j + wo] for i in range(kh) for j in range(kw)], axis=0)


def _conv_planes(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
  """CHWN convolution as (C_out, k*k*C_in) @ (k*k*C_in, H'*W'*N): the batch stays on the lanes."""
  kh, kw, cin, cout = kernel.shape
  planes = _shifted_planes(x, kh, kw)
  out = jnp.matmul(kernel.reshape(kh * kw * cin, cout).T, planes.reshape(kh * kw * cin, -1), precision=precision)
  return out.reshape(cout, *planes.shape[1:])


class Conv(nn.Module):
  """``flax.linen.Conv(features, kernel_size, padding='VALID')`` with a selectable implementation; inputs
  and outputs in ``layout`` (``"NHWC"``, or ``"CHWN"``: channels first, batch last)."""

  features: int
  kernel_size: tuple[int, int]
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  impl: str = "auto"
  precision: str | None = None
  layout: str = "NHWC"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, self.layout)
    kh, kw = self.kernel_size
    cin = x.shape[channel_axis(self.layout)]
    kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features), jnp.float32)
    y = conv2d_valid(x, kernel.astype(x.dtype), self.impl, self.precision, self.layout)
    if self.use_bias:
      y = add_bias(y, self.param("bias", self.bias_init, (self.features,), jnp.float32), self.layout)
    return y


def channel_axis(layout: str) -> int:
  return 0 if layout == "CHWN" else 3


def check_input(x: jax.Array, layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"`layout` is {layout!r}, but should be one of {LAYOUTS}.")
  if x.ndim != 4:
    raise ValueError(f"Conv expects {layout} input of rank 4, but got shape {tuple(x.shape)}.")


def add_bias(y: jax.Array, bias: jax.Array, layout: str) -> jax.Array:
  bias = bias.astype(y.dtype)
  return y + (bias[:, None, None, None] if layout == "CHWN" else bias)


class NNXConv(nnx.Module):
  """The NNX twin of :class:`Conv`: ``kernel`` (HWIO) and ``bias`` as ``nnx.Param``, same computation."""

  def __init__(
    self,
    in_features: int,
    features: int,
    kernel_size: tuple[int, int],
    *,
    use_bias: bool = True,
    kernel_init: Callable = _LECUN_NORMAL,
    bias_init: Callable = nn.initializers.zeros,
    impl: str = "auto",
    precision: str | None = None,
    layout: str = "NHWC",
    rngs: nnx.Rngs,
  ):
    kh, kw = kernel_size
    self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, in_features, features), jnp.float32))
    self.bias = nnx.Param(bias_init(rngs.params(), (features,), jnp.float32)) if use_bias else nnx.data(None)
    self.impl, self.precision, self.layout = impl, precision, layout

  def __call__(self, x: jax.Array) -> jax.Array:
    check_input(x, self.layout)
    y = conv2d_valid(x, self.kernel[...].astype(x.dtype), self.impl, self.precision, self.layout)
    return y if self.bias is None else add_bias(y, self.bias[...], self.layout)
