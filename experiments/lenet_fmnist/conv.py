"""A 2-D 'VALID' convolution with `flax.linen.Conv`'s parameters and several ways to compute it.

XLA's CPU backend runs the small convolutions of LeNet (1 -> 6 and 6 -> 16 channels, 5x5) and above
all their gradients far below what the same arithmetic achieves as a matrix multiply, and LeNet's
channel counts are too small to fill a CPU's vector lanes. So:

* ``"lanes"`` puts the batch on the vector lanes: activations laid out (C, H, W, N). The convolution
  is one matrix product of the kernel, (C_out, k*k*C_in), with the k*k*C_in shifted (H', W', N) planes
  stacked along the leading axis: the stack is k*k contiguous block copies, not im2col's gather that
  interleaves k*k*C_in values per output position, and the product's long axis is H'*W'*N. The
  kernel's gradient is a matrix product of the same planes; the input's is taken one kernel row at a
  time, so that the planes' cotangents are summed into the input while they are in cache. With one input
  channel (LeNet's first layer) the planes would be 25 copies of the images for 25 multiply-adds per
  output: there the output is summed directly from the shifted windows, and the kernel's gradient
  takes the planes one output row at a time. Both are reverse-mode only (custom VJPs).
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

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "im2col", "lanes")
LAYOUTS = ("NHWC", "CHWN")
LECUN_NORMAL = nn.initializers.lecun_normal()  # flax.linen.Conv's default kernel initializer
_NHWC_TO_CHWN = (3, 1, 2, 0)  # (its own inverse)


def swap_batch_and_channels(x: jax.Array) -> jax.Array:
  """NHWC <-> CHWN (the permutation is its own inverse).

  With one channel (or a batch of one) this is a 2-D transpose, (N, H*W) <-> (H*W, N), written as one: XLA:CPU then
  materializes it once, where it fuses a 4-D transpose into each of its consumers (e.g. the 25 shifted
  slices of a 5x5 convolution, each a strided gather of the whole batch).
  """
  a, h, w, b = x.shape
  if b == 1:  # (a, H*W) -> (H*W, a)
    return x.reshape(a, h * w).T.reshape(1, h, w, a)
  if a == 1:  # (H*W, b) -> (b, H*W)
    return x.reshape(h * w, b).T.reshape(b, h, w, 1)
  return jnp.transpose(x, _NHWC_TO_CHWN)


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

  ``precision``: jax's name, or None. ``impl="lanes"`` (``"auto"``'s choice on CPU) differentiates in reverse
  mode only (``jax.grad``/``jax.vjp``; ``jax.jvp`` raises); the others in both modes.
  """
  check_input(x, layout)
  if kernel.ndim != 4:
    raise ValueError(f"`kernel` should be HWIO of rank 4, but has shape {tuple(kernel.shape)}.")
  kh, kw, cin, cout = kernel.shape
  h, w, channels = x.shape[1], x.shape[2], x.shape[channel_axis(layout)]
  if channels != cin:
    raise ValueError(
      f"`x` ({layout}, shape {tuple(x.shape)}) has {channels} channels, but `kernel` (HWIO, shape "
      f"{tuple(kernel.shape)}) expects {cin}."
    )
  if kh > h or kw > w:
    raise ValueError(f"`kernel` is {kh}x{kw}, larger than the {h}x{w} images of `x` (shape {tuple(x.shape)}).")
  impl = resolve_impl(impl)
  if native_layout(impl) != layout:  # transpose to the formulation's own layout and back
    own = conv2d_valid(swap_batch_and_channels(x), kernel, impl, precision, native_layout(impl))
    return swap_batch_and_channels(own)
  if impl == "lanes":
    return _conv_planes(x, kernel, precision)
  if impl == "xla":
    return lax.conv_general_dilated(
      x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )
  n = x.shape[0]
  ho, wo = h - kh + 1, w - kw + 1
  # Patch features ordered (kh, kw, cin), matching the HWIO kernel's row-major reshape.
  patches = jnp.concatenate([x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)], axis=-1)
  out = jnp.matmul(
    patches.reshape(n * ho * wo, kh * kw * cin), kernel.reshape(kh * kw * cin, cout), precision=precision
  )
  return out.reshape(n, ho, wo, cout)


def _shifted_planes(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """(kh*kw*C, H', W', N): the CHWN ``x``'s k*k shifted windows stacked along the leading axis, in
  (kh, kw, C) order (the HWIO kernel's row-major order).

  A loop over the windows, one block copy each: XLA:CPU compiles it as one kernel, where k*k slices are k*k
  kernels (each about as long to compile as any other), and runs it as fast. With it LeNet's training step
  compiles 44 kernels fewer than with slices, and its evaluation 21 fewer (29 in all).
  """
  c, h, w, n = x.shape
  ho, wo = h - kh + 1, w - kw + 1

  def window(t):
    return lax.dynamic_slice(x, (0, t // kw, t % kw, 0), (c, ho, wo, n))

  return lax.map(window, jnp.arange(kh * kw)).reshape(kh * kw * c, ho, wo, n)


def _conv_planes(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
  """CHWN convolution as (C_out, k*k*C_in) @ (k*k*C_in, H'*W'*N): the batch stays on the lanes.

  With one input channel the sum of k*k shifted planes is computed directly instead (:func:`_conv_direct`).
  """
  if kernel.shape[2] == 1:
    return _conv_direct(*_vary_alike(x, kernel), precision)
  return _conv_by_planes(*_vary_alike(x, kernel), precision)


def _vary_alike(*arrays: jax.Array) -> list[jax.Array]:
  """``arrays`` marked as varying over the union of their ``shard_map`` axes (a no-op outside one).

  A custom VJP must return each input's cotangent with that input's type, and a kernel that is the same
  on every shard has a gradient that is not: with the mark applied outside the custom VJP, JAX's own
  transpose of it sums the gradient over those axes.
  """
  varying = [_varying_axes(a) for a in arrays]
  union = frozenset().union(*varying)
  return [
    lax.pcast(a, tuple(sorted(union - v)), to="varying") if union - v else a
    for a, v in zip(arrays, varying, strict=True)
  ]


def _varying_axes(a: jax.Array) -> frozenset:
  """The ``shard_map`` axes ``a`` varies over (``aval.vma``; ``aval.mat.varying`` in jax 0.10)."""
  aval = jax.typeof(a)
  vma = getattr(aval, "vma", None)
  return frozenset(vma if vma is not None else getattr(getattr(aval, "mat", None), "varying", ()))


def _planes_product(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
  return _kernel_times_planes(kernel, _shifted_planes(x, *kernel.shape[:2]), precision)


def _kernel_times_planes(kernel: jax.Array, planes: jax.Array, precision) -> jax.Array:
  """(C_out, H', W', N): the HWIO kernel as (C_out, k*k*C_in) times the (k*k*C_in, H', W', N) planes."""
  cout = kernel.shape[3]
  out = jnp.matmul(kernel.reshape(-1, cout).T, planes.reshape(planes.shape[0], -1), precision=precision)
  return out.reshape(cout, *planes.shape[1:])


def _input_grad_by_kernel_rows(g: jax.Array, kernel: jax.Array, precision) -> jax.Array:
  """CHWN gradient of :func:`_planes_product`'s input for output cotangent ``g``, one kernel row at a time: the
  row's k*C_in planes' cotangents (its slice of the kernel, transposed, times ``g``), each shifted to its column
  and summed into a band of input rows, which is added in place.

  JAX's own transpose writes all k*k*C_in planes' cotangents (9.8 MB for LeNet's second layer at batch 256),
  then sums k*k shifted ones for every input value; a row's (2 MB) are used while still in cache. Computed in
  float32 at least, as the forward's products accumulate.
  """
  kh, kw, cin, cout = kernel.shape
  ho, wo = g.shape[1], g.shape[2]
  dtype = jnp.promote_types(jnp.result_type(g.dtype, kernel.dtype), jnp.float32)
  rows = kernel.astype(dtype).reshape(kh, kw * cin, cout)
  g = g.astype(dtype).reshape(cout, -1)

  def band(i):  # (C_in, H', W, N): kernel row i's contribution to input rows i .. i + H' - 1
    planes = jnp.matmul(rows[i], g, precision=precision).reshape(kw, cin, ho, wo, -1)
    return sum(jnp.pad(planes[j], ((0, 0), (0, 0), (j, kw - 1 - j), (0, 0))) for j in range(kw))

  def add_band(i, dx):
    return lax.dynamic_update_slice_in_dim(dx, lax.dynamic_slice_in_dim(dx, i, ho, axis=1) + band(i), i, axis=1)

  # Starting from row 0's band, padded, rather than from zeros: the loop's carry then has the cotangent's type
  # (inside shard_map, its varying axes).
  first = jnp.pad(band(0), ((0, 0), (0, kh - 1), (0, 0), (0, 0)))
  return lax.fori_loop(1, kh, add_band, first)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_by_planes(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
  """CHWN convolution as :func:`_planes_product`, with the input's gradient from
  :func:`_input_grad_by_kernel_rows` (reverse mode only, as :func:`_conv_direct`)."""
  return _planes_product(x, kernel, precision)


def _conv_by_planes_fwd(x, kernel, precision):
  planes = _shifted_planes(x, *kernel.shape[:2])
  return _kernel_times_planes(kernel, planes, precision), (planes, kernel)


def _conv_by_planes_bwd(precision, residuals, g):
  planes, kernel = residuals  # (the planes have the input's dtype)
  dk = jnp.matmul(planes.reshape(planes.shape[0], -1), g.reshape(kernel.shape[3], -1).T, precision=precision)
  dx = _input_grad_by_kernel_rows(g, kernel, precision)
  return dx.astype(planes.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_conv_by_planes.defvjp(_conv_by_planes_fwd, _conv_by_planes_bwd)


def _direct_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """CHWN convolution as the sum over (i, j, c) of ``kernel[i, j, c, o]`` times the (i, j)-shifted window of
  channel c, for each output channel o.

  Each output channel is one elementwise pass: it reads ``x`` (small, cache-resident) k*k*C_in times and
  writes only its output, where the planes' product first writes and reads k*k*C_in copies of the
  input. Worth it for few input channels (k*k*C_in multiply-adds per output value). The loop over
  output channels is also what makes XLA keep the result: without it XLA fuses the sum, as a cheap
  elementwise producer, into each of its consumers (the batch norm's passes) and computes it again in each.
  """
  kh, kw, cin, cout = kernel.shape
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out_dtype = jnp.result_type(x.dtype, kernel.dtype)
  dtype = jnp.promote_types(out_dtype, jnp.float32)  # accumulate low-precision inputs in float32
  x, kernel = x.astype(dtype), kernel.astype(dtype)

  def channel(w):  # (kh, kw, cin): one output channel's kernel
    total = None
    for c in range(cin):
      for i in range(kh):
        for j in range(kw):
          term = w[i, j, c] * x[c, i : i + ho, j : j + wo]
          total = term if total is None else total + term
    return total

  # lax.map, not a loop carrying the output: under shard_map a carry would need the inputs' varying axes.
  out = lax.map(channel, jnp.moveaxis(kernel, 3, 0))
  return out.astype(out_dtype)


def _kernel_grad_by_rows(x: jax.Array, g: jax.Array, kernel_shape, precision) -> jax.Array:
  """HWIO gradient of :func:`_direct_sum`'s kernel for output cotangent ``g``: the planes' product
  (k*k*C_in, P) @ (P, C_out), one output row at a time.

  A row's planes (k*k*C_in x W' x N) stay in cache where the whole layer's (k*k times the input, 15 MB
  for LeNet's first layer at batch 256) would not: the product reads them from cache, not memory. A
  loop rather than unrolled rows: the same speed, and about 2 s less to compile the training step.
  """
  kh, kw, cin, cout = kernel_shape

  def row(r):
    planes = _shifted_planes(lax.dynamic_slice_in_dim(x, r, kh, axis=1), kh, kw)
    g_row = lax.dynamic_index_in_dim(g, r, axis=1, keepdims=False)
    return jnp.matmul(planes.reshape(kh * kw * cin, -1), g_row.reshape(cout, -1).T, precision=precision)

  total = jnp.sum(lax.map(row, jnp.arange(g.shape[1])), axis=0)
  return total.reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_direct(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
  """CHWN convolution as :func:`_direct_sum`, with the kernel's gradient from :func:`_kernel_grad_by_rows`
  (JAX's own transpose of the sum would be k*k*C_in*C_out separate reductions) and the input's from
  :func:`_input_grad_by_kernel_rows` (XLA drops it under ``jit`` when, as for images, nothing uses it).

  Reverse mode only: ``jax.jvp``/``jax.jacfwd`` through it raise (a custom JVP would leave JAX to transpose
  the sum itself, the slow way above). ``precision`` applies to the gradients' products; the forward
  sum is exact float32 arithmetic.
  """
  return _direct_sum(x, kernel)


def _conv_direct_fwd(x, kernel, precision):
  return _direct_sum(x, kernel), (x, kernel)


def _conv_direct_bwd(precision, residuals, g):
  x, kernel = residuals
  dx = _input_grad_by_kernel_rows(g, kernel, precision).astype(x.dtype)
  wide = jnp.promote_types(jnp.result_type(x.dtype, g.dtype), jnp.float32)  # as the forward: float32 at least
  dk = _kernel_grad_by_rows(x.astype(wide), g.astype(wide), kernel.shape, precision).astype(kernel.dtype)
  return dx, dk


_conv_direct.defvjp(_conv_direct_fwd, _conv_direct_bwd)


class Conv(nn.Module):
  """``flax.linen.Conv(features, kernel_size, padding='VALID')`` with a selectable implementation; inputs
  and outputs in ``layout`` (``"NHWC"``, or ``"CHWN"``: channels first, batch last). Reverse mode only
  with ``impl="lanes"`` (see :func:`conv2d_valid`)."""

  features: int
  kernel_size: tuple[int, int]
  use_bias: bool = True
  kernel_init: Callable = LECUN_NORMAL
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
