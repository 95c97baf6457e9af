"""The chapter's LeNet in Flax NNX (:class:`NNXLeNet`, ``--api nnx``): the twin of :class:`models.LeNet`, with the
same layer names, shapes, initializers and computation, and its convolution (:class:`NNXConv`).

A module of its own so that a linen run never imports ``flax.nnx`` (0.12-0.15 s of a 2-core CPU's start-up).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from bnjax.nnx import BatchNorm as NNXBatchNorm
from experiments.lenet_fmnist.conv import LECUN_NORMAL, add_bias, channel_axis, check_input, conv2d_valid, native_layout
from experiments.lenet_fmnist.models import (
  CHAPTER_EPSILON,
  CHAPTER_MOMENTUM,
  XAVIER,
  check_images,
  check_norm,
  check_precision,
  example_mask,
  flatten,
  pool,
  to_layout,
)


class NNXConv(nnx.Module):
  """The NNX twin of :class:`Conv`: ``kernel`` (HWIO) and ``bias`` as ``nnx.Param``, same computation."""

  def __init__(
    self,
    in_features: int,
    features: int,
    kernel_size: tuple[int, int],
    *,
    use_bias: bool = True,
    kernel_init: Callable = LECUN_NORMAL,
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


class NNXLeNet(nnx.Module):
  """The same LeNet as a Flax NNX module: same layer names, shapes, initializers and computation.

  ``model.train()`` / ``model.eval()`` (or ``nnx.view``) switch the batch-norm layers between batch
  and running statistics. :func:`lenet_to_nnx` / :func:`lenet_from_nnx` move variables between this
  module and :class:`LeNet`'s ``{"params", "batch_stats"}``.
  """

  def __init__(
    self,
    norm: str = "ours",
    *,
    num_classes: int = 10,
    conv_impl: str = "auto",
    precision: str = "highest",
    axis_name: str | None = None,
    rngs: nnx.Rngs,
  ):
    check_norm(norm)
    check_precision(precision)
    self.norm, self.axis_name, self.layout = norm, axis_name, native_layout(conv_impl)
    conv = functools.partial(
      NNXConv, kernel_init=XAVIER, impl=conv_impl, precision=precision, layout=self.layout, rngs=rngs
    )
    linear = functools.partial(nnx.Linear, kernel_init=XAVIER, precision=precision, rngs=rngs)
    conv_axis = channel_axis(self.layout)
    self.conv1 = conv(1, 6, (5, 5))
    self.conv2 = conv(6, 16, (5, 5))
    self.fc1 = linear(256, 120)
    self.fc2 = linear(120, 84)
    self.fc3 = linear(84, num_classes)
    for name, features, axis in (("bn1", 6, conv_axis), ("bn2", 16, conv_axis), ("bn3", 120, -1), ("bn4", 84, -1)):
      setattr(self, name, self._make_norm(features, axis, rngs))

  def _make_norm(self, features: int, axis: int, rngs: nnx.Rngs):
    if self.norm == "none":
      return nnx.data(None)
    cls = NNXBatchNorm if self.norm == "ours" else nnx.BatchNorm
    return cls(
      features, axis=axis, momentum=CHAPTER_MOMENTUM, epsilon=CHAPTER_EPSILON, axis_name=self.axis_name, rngs=rngs
    )

  def _norm(self, bn, x, mask):
    return x if bn is None else bn(x, mask=example_mask(mask, x, self.layout))

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    check_images(x, mask)
    x = pool(nn.sigmoid(self._norm(self.bn1, self.conv1(to_layout(x, self.layout)), mask)))
    x = pool(nn.sigmoid(self._norm(self.bn2, self.conv2(x), mask)))
    x = flatten(x, self.layout)
    x = nn.sigmoid(self._norm(self.bn3, self.fc1(x), mask))
    x = nn.sigmoid(self._norm(self.bn4, self.fc2(x), mask))
    return self.fc3(x)


def lenet_to_nnx(model: NNXLeNet, variables: dict) -> NNXLeNet:
  """Loads :class:`LeNet` variables (``{"params", "batch_stats"}``) into ``model``, in place; returns it."""
  state = {name: dict(layer) for name, layer in variables["params"].items()}
  for name, stats in variables.get("batch_stats", {}).items():
    state[name] = {**state.get(name, {}), **stats}
  nnx.update(model, state)
  return model


def lenet_from_nnx(model: NNXLeNet) -> dict:
  """:class:`LeNet` variables (``{"params"[, "batch_stats"]}``) holding ``model``'s current values."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  return {"params": params, "batch_stats": stats} if stats else {"params": params}
