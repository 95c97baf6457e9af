"""The chapter's LeNet, with the normalization layer selectable: ours, Flax's, or none.

    conv 6@5x5 - BN - sigmoid - avgpool 2 - conv 16@5x5 - BN - sigmoid - avgpool 2 - flatten -
    dense 120 - BN - sigmoid - dense 84 - BN - sigmoid - dense 10

Inputs are NHWC (N, 28, 28, 1) images. Weights use Xavier-uniform initialization, as the chapter's
``train_ch6`` does; biases start at zero (PyTorch would draw them from a small uniform).

Precision policy: the convolutions and matmuls run at ``precision="highest"`` (true float32) unless
told otherwise. XLA's default on GPUs and TPUs is TF32 or bf16 passes for float32 operands, which moves
LeNet's logits by ~1e-3 relative to the CPU and to PyTorch's float32 matmuls; LeNet's arithmetic is
tiny, so exact float32 costs little. ``"default"`` and ``"high"`` are jax's ``Precision`` names, for
speed where it matters more than agreement (on CPU all three compute the same).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax import BatchNorm, fold_batch_norm
from experiments.lenet_fmnist.conv import Conv, channel_axis, native_layout, swap_batch_and_channels

NORMS = ("ours", "flax", "none")
PRECISIONS = ("default", "high", "highest")
# The chapter's hyper-parameters: BatchNorm(..., eps=1e-5, momentum=0.9).
CHAPTER_MOMENTUM = 0.9
CHAPTER_EPSILON = 1e-5


XAVIER = nn.initializers.xavier_uniform()


def to_layout(images: jax.Array, layout: str) -> jax.Array:
  """NHWC ``images`` in the convolutional blocks' ``layout`` (``"CHWN"``: the batch on the vector lanes)."""
  return swap_batch_and_channels(images) if layout == "CHWN" else images


def flatten(x: jax.Array, layout: str) -> jax.Array:
  """(N, H*W*C) features in NHWC order (``fc1``'s rows) from the last block's output in ``layout``."""
  return to_layout(x, layout).reshape(x.shape[-1] if layout == "CHWN" else x.shape[0], -1)


def example_mask(mask: jax.Array | None, x: jax.Array, layout: str) -> jax.Array | None:
  """The per-example ``mask`` (N,) shaped to broadcast over activations ``x``: (N, F), or 4-D in ``layout``."""
  if mask is None:
    return None
  if x.ndim == 4 and layout == "CHWN":
    return mask.reshape(1, 1, 1, -1)
  return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def pool(x: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2, over the spatial axes of NHWC or CHWN ``x`` (axes 1 and 2 in both)."""
  return nn.avg_pool(x, (2, 2), (2, 2))


def check_norm(norm: str) -> str:
  if norm not in NORMS:
    raise ValueError(f"`norm` is {norm!r}, but should be one of {NORMS}.")
  return norm


def check_precision(precision: str) -> str:
  if precision not in PRECISIONS:
    raise ValueError(f"`precision` is {precision!r}, but should be one of {PRECISIONS}.")
  return precision


class LeNet(nn.Module):
  """LeNet-5 as in D2L, optionally with batch normalization after every conv/dense but the last.

  Attributes:
    norm: "ours" (``bnjax.BatchNorm``), "flax" (``flax.linen.BatchNorm``) or "none".
    num_classes: size of the output layer.
    unbiased_running_var: with ``norm="ours"``, update running variances as PyTorch does (for
      porting ``nn.BatchNorm2d/1d`` models exactly).
    conv_impl: how convolutions are computed, see :class:`~experiments.lenet_fmnist.conv.Conv` (same
      parameters either way).
    axis_name: the mapped axis over which the BN layers combine batch statistics (data-parallel
      training, ``bnjax.sync.DATA``); None on one device.
    precision: of the convolutions and matmuls, one of :data:`PRECISIONS` (see the module docstring).
  """

  norm: str = "ours"
  num_classes: int = 10
  unbiased_running_var: bool = False
  conv_impl: str = "auto"
  axis_name: str | None = None
  precision: str = "highest"

  def setup(self):
    check_norm(self.norm)
    if self.unbiased_running_var and self.norm != "ours":
      raise ValueError(f"`unbiased_running_var=True` needs norm='ours', but `norm` is {self.norm!r}.")
    check_precision(self.precision)

  def _norm(self, x, train: bool, name: str, mask, layout: str):
    if self.norm == "none":
      return x
    kwargs = dict(
      use_running_average=not train,
      axis=channel_axis(layout) if x.ndim == 4 else -1,
      momentum=CHAPTER_MOMENTUM,
      epsilon=CHAPTER_EPSILON,
      axis_name=self.axis_name,
      name=name,
    )
    if self.norm == "ours":
      layer = BatchNorm(unbiased_running_var=self.unbiased_running_var, **kwargs)
    else:
      layer = nn.BatchNorm(**kwargs)
    return layer(x, mask=example_mask(mask, x, layout))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    """Logits for NHWC images ``x``; ``mask`` (N,) bool leaves padded examples out of the BN statistics.

    The convolutional blocks run in their convolution's native layout (CHWN for ``"lanes"``), the dense
    ones on (N, F); the parameters are the same either way.
    """
    check_images(x, mask)
    layout = native_layout(self.conv_impl)
    conv = functools.partial(Conv, kernel_init=XAVIER, impl=self.conv_impl, precision=self.precision, layout=layout)
    dense = functools.partial(nn.Dense, kernel_init=XAVIER, precision=self.precision)
    x = conv(6, (5, 5), name="conv1")(to_layout(x, layout))
    x = pool(nn.sigmoid(self._norm(x, train, "bn1", mask, layout)))
    x = conv(16, (5, 5), name="conv2")(x)
    x = pool(nn.sigmoid(self._norm(x, train, "bn2", mask, layout)))
    x = flatten(x, layout)  # NHWC flatten: (h, w, c) order, unlike PyTorch's (c, h, w)
    x = nn.sigmoid(self._norm(dense(120, name="fc1")(x), train, "bn3", mask, layout))
    x = nn.sigmoid(self._norm(dense(84, name="fc2")(x), train, "bn4", mask, layout))
    return dense(self.num_classes, name="fc3")(x)


def check_images(x: jax.Array, mask: jax.Array | None) -> None:
  if x.ndim != 4 or x.shape[1:] != (28, 28, 1):
    raise ValueError(f"LeNet expects NHWC images of shape (N, 28, 28, 1), but got {tuple(x.shape)}.")
  if mask is not None and tuple(mask.shape) != (x.shape[0],):
    raise ValueError(f"`mask` has shape {tuple(mask.shape)}, but should be ({x.shape[0]},): one flag per example.")


# Which BN layer follows which conv/dense layer in LeNet.
LENET_BN_AFTER = {"conv1": "bn1", "conv2": "bn2", "fc1": "bn3", "fc2": "bn4"}


def fold_lenet(variables: dict, epsilon: float = CHAPTER_EPSILON) -> dict:
  """Variables of ``LeNet(norm="none")`` with the same evaluation-mode logits as BN LeNet ``variables``.

  Every BN layer is folded into the conv/dense layer before it (:func:`bnjax.fold_batch_norm`); ``fc3``
  is copied. Works for ``norm="ours"`` and ``norm="flax"`` variables alike (same names).
  """
  params, stats = variables["params"], variables.get("batch_stats")
  if not stats:
    raise ValueError("`variables` has no 'batch_stats': these are plain LeNet variables, nothing to fold.")
  missing = sorted(set(LENET_BN_AFTER.values()) - set(stats))
  if missing:
    raise KeyError(f"`variables['batch_stats']` has no {missing}; BN LeNet has {sorted(LENET_BN_AFTER.values())}.")
  folded = {
    layer: fold_batch_norm(params[layer], params[bn], stats[bn], epsilon) for layer, bn in LENET_BN_AFTER.items()
  }
  return {"params": {**folded, "fc3": params["fc3"]}}


def init_lenet(model: LeNet, key: jax.Array, batch_size: int = 2) -> dict:
  """Returns the model's variables (``params`` and, with a norm, ``batch_stats``).

  ``init`` runs jitted: one compiled program (cacheable) instead of dozens of op-by-op dispatches.
  """
  return jax.jit(lambda key: model.init(key, jnp.zeros((batch_size, 28, 28, 1), jnp.float32), train=False))(key)
