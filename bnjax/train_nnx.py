"""The training loop of :mod:`bnjax.train` for Flax NNX models: ``nnx.jit``, ``nnx.Optimizer``, in-place state.

Same plan and numbers as the linen loop: data on the device (uint8 images scaled in the step), an
on-device shuffle, full batches run in chunks of steps inside one compiled program (a
``lax.fori_loop`` over the model's split state), the remainder batch padded and masked, one
evaluation program. The model must accept ``mask=`` (as :class:`bnjax.models.NNXLeNet` does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from bnjax.train import (
  Metrics,
  _add,
  _batch_metrics,
  as_float_images,
  batch_indices,
  cross_entropy,
  epoch_plan,
  eval_batch,
  scan_chunks,
  zero_metrics,
)


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, images, labels, mask=None) -> Metrics:
  """One SGD step on the mean cross-entropy; ``model``'s parameters and batch statistics change in place."""
  images = as_float_images(images)

  def loss_fn(model):
    logits = model(images) if mask is None else model(images, mask=mask)
    loss, loss_sum = cross_entropy(logits, labels, mask)
    return loss, (logits, loss_sum)

  (_, (logits, loss_sum)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return _batch_metrics(logits, labels, loss_sum, mask)


@functools.partial(nnx.jit, static_argnames=("batch_size", "num_steps", "padded"))
def _steps(model, optimizer, metrics, images, labels, perm, start, valid, batch_size, num_steps, padded):
  graphdef, state = nnx.split((model, optimizer))

  def body(i, carry):
    state, metrics = carry
    model, optimizer = nnx.merge(graphdef, state)
    idx, mask = batch_indices(perm, start + i * batch_size, batch_size, valid if padded else None)
    m = train_step(model, optimizer, jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0), mask)
    return nnx.state((model, optimizer)), _add(metrics, m)

  state, metrics = jax.lax.fori_loop(0, num_steps, body, (state, metrics))
  nnx.update((model, optimizer), state)
  return metrics


def train_epoch(
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  batch_size: int,
  *,
  scan_chunk: int = 47,
  on_progress: Callable[[int], None] | None = None,
) -> Metrics:
  """One pass over the data in ``key``'s order, in training mode; returns the summed metrics."""
  if batch_size < 1:
    raise ValueError(f"`batch_size` is {batch_size}, but should be at least 1.")
  model.train()
  perm = jax.random.permutation(key, images.shape[0])
  metrics = zero_metrics()
  plan = epoch_plan(images.shape[0], batch_size)
  num_full = sum(size == batch_size for _, size in plan)
  done = 0
  for n in scan_chunks(num_full, scan_chunk):
    metrics = _steps(model, optimizer, metrics, images, labels, perm, plan[done][0], 0, batch_size, n, False)
    done += n
    if on_progress is not None:
      on_progress(n)
  if done < len(plan):
    start, size = plan[done]
    metrics = _steps(model, optimizer, metrics, images, labels, perm, start, size, batch_size, 1, True)
    if on_progress is not None:
      on_progress(1)
  return metrics


@functools.partial(nnx.jit, static_argnames=("batch_size",))
def _evaluate(model, images, labels, batch_size):
  graphdef, state = nnx.split(model)

  def body(metrics, i):
    x, y, mask = eval_batch(images, labels, i, batch_size)
    logits = nnx.merge(graphdef, state)(x)
    return _add(metrics, _batch_metrics(logits, y, cross_entropy(logits, y, mask)[1], mask)), None

  metrics, _ = jax.lax.scan(body, zero_metrics(), jnp.arange(-(-images.shape[0] // batch_size)))
  return metrics


def evaluate(model: nnx.Module, images: jax.Array, labels: jax.Array, batch_size: int = 1000) -> Metrics:
  """Metrics in evaluation mode (running statistics); the model is left in training mode."""
  if batch_size < 1:
    raise ValueError(f"`batch_size` is {batch_size}, but should be at least 1.")
  model.eval()
  try:
    return _evaluate(model, images, labels, batch_size=min(batch_size, max(images.shape[0], 1)))
  finally:
    model.train()
