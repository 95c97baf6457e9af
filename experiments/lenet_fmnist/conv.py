"""A 2-D 'VALID' convolution with `flax.linen.Conv`'s parameters and two ways to compute it.

XLA's CPU backend runs the small convolutions of LeNet (1 -> 6 and 6 -> 16 channels, 5x5) and above
all their gradients far below what the same arithmetic achieves as a matrix multiply. ``"im2col"``
gathers the k*k shifted windows into a patch matrix (N*H'*W', k*k*C_in) and multiplies it by the
kernel reshaped to (k*k*C_in, C_out); its gradients are then a matmul plus pads of the windows, which
the CPU backend runs well. ``"xla"`` is ``lax.conv_general_dilated``, the right choice on GPUs.
``"auto"`` picks im2col on CPU and XLA's convolution elsewhere. All give the same numbers up to
float32 rounding and use the same parameters (``kernel`` HWIO, ``bias``), so checkpoints of this
module and of ``flax.linen.Conv(padding='VALID')`` are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

IMPLS = ("auto", "xla", "im2col")
_LECUN_NORMAL = nn.initializers.lecun_normal()  # flax.linen.Conv's default kernel initializer


def conv2d_valid(x: jax.Array, kernel: jax.Array, impl: str = "auto", precision: str | None = None) -> jax.Array:
  """Stride-1 'VALID' convolution of NHWC ``x`` with an HWIO ``kernel`` (``precision``: jax's name, or None)."""
  if impl not in IMPLS:
    raise ValueError(f"`impl` is {impl!r}, but should be one of {IMPLS}.")
  if impl == "auto":
    impl = "im2col" if jax.default_backend() == "cpu" else "xla"
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


class Conv(nn.Module):
  """``flax.linen.Conv(features, kernel_size, padding='VALID')`` with a selectable implementation."""

  features: int
  kernel_size: tuple[int, int]
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  impl: str = "auto"
  precision: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"Conv expects NHWC input of rank 4, but got shape {tuple(x.shape)}.")
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
    y = conv2d_valid(x, kernel.astype(x.dtype), self.impl, self.precision)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(y.dtype)
    return y


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
    rngs: nnx.Rngs,
  ):
    kh, kw = kernel_size
    self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, in_features, features), jnp.float32))
    self.bias = nnx.Param(bias_init(rngs.params(), (features,), jnp.float32)) if use_bias else nnx.data(None)
    self.impl, self.precision = impl, precision

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"Conv expects NHWC input of rank 4, but got shape {tuple(x.shape)}.")
    y = conv2d_valid(x, self.kernel[...].astype(x.dtype), self.impl, self.precision)
    return y if self.bias is None else y + self.bias[...].astype(y.dtype)
