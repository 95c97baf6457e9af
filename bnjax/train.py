"""Jitted training and evaluation of a classifier with batch statistics (the chapter's ``train_ch6``).

The data sit on the device; each epoch shuffles with an on-device permutation, and every step
gathers its batch inside the jitted step, so the hot loop makes no host-to-device copies. Metrics
(summed loss, correct predictions, count) accumulate on the device and are read once per epoch.
Two loop drivers give the same numbers: ``"step"`` dispatches one jitted step per batch, ``"scan"``
runs chunks of steps inside one ``lax.scan`` ("auto"). With the im2col convolutions of
:mod:`bnjax.conv`, scan is the faster driver on CPU too (see ``experiments.bench``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

Metrics = dict[str, jax.Array]
LOOPS = ("auto", "step", "scan")


class TrainState(train_state.TrainState):
  """Parameters, optimizer state and the model's running batch statistics."""

  batch_stats: Any


def create_train_state(model: nn.Module, key: jax.Array, learning_rate: float, sample_shape=(2, 28, 28, 1)):
  """Initializes the model (Xavier-uniform weights) and plain SGD, as the chapter does.

  ``init`` runs jitted: one compiled program (cacheable) instead of dozens of op-by-op dispatches.
  """
  variables = jax.jit(lambda key: model.init(key, jnp.zeros(sample_shape, jnp.float32), train=False))(key)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables.get("batch_stats", {}),
    tx=optax.sgd(learning_rate),
  )


def zero_metrics() -> Metrics:
  return {
    "loss_sum": jnp.zeros((), jnp.float32),
    "correct": jnp.zeros((), jnp.int32),
    "count": jnp.zeros((), jnp.int32),
  }


def _batch_metrics(logits: jax.Array, labels: jax.Array, loss_sum: jax.Array, mask: jax.Array | None) -> Metrics:
  hits = jnp.argmax(logits, -1) == labels
  return {
    "loss_sum": loss_sum,
    "correct": jnp.sum(hits if mask is None else hits & mask).astype(jnp.int32),
    "count": jnp.asarray(labels.shape[0] if mask is None else jnp.sum(mask), jnp.int32),
  }


def _add(a: Metrics, b: Metrics) -> Metrics:
  return jax.tree_util.tree_map(jnp.add, a, b)


def summarize(metrics: Metrics) -> dict[str, float]:
  """Host-side averages: ``loss`` (mean per example) and ``acc``."""
  m = jax.device_get(metrics)
  count = max(int(m["count"]), 1)
  return {"loss": float(m["loss_sum"]) / count, "acc": int(m["correct"]) / count}


# x / 255 for every uint8 value, computed by NumPy: XLA would rewrite a division by the constant 255 as a
# multiplication by its reciprocal, which is 1 ulp off for half the values.
_PIXEL_TABLE = np.arange(256, dtype=np.float32) / np.float32(255.0)


def as_float_images(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1] (``x / 255``, bit for bit as :func:`bnjax.data.scale_pixels`).

  Keeping the data set as uint8 on the device and scaling each batch inside the step (a lookup in a
  256-entry table) saves three quarters of the data set's memory.
  """
  if images.dtype == jnp.uint8:
    return jnp.asarray(_PIXEL_TABLE)[images]
  return images


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """``(mean, sum)`` of the cross-entropy over the real examples (all, or those where ``mask``)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mask is None:
    return jnp.mean(losses), jnp.sum(losses)
  loss_sum = jnp.sum(jnp.where(mask, losses, 0.0))
  return loss_sum / jnp.sum(mask), loss_sum


def batch_indices(perm: jax.Array, start, batch_size: int, valid=None) -> tuple[jax.Array, jax.Array | None]:
  """Indices ``perm[start : start + batch_size]`` and, with ``valid``, the mask of the first ``valid`` (real) ones.

  Positions past the end of ``perm`` wrap around (any real example will do as padding: it is masked).
  """
  if valid is None:
    return jax.lax.dynamic_slice_in_dim(perm, start, batch_size), None
  pos = start + jnp.arange(batch_size)
  return perm[pos % perm.shape[0]], jnp.arange(batch_size) < valid


def eval_batch(images: jax.Array, labels: jax.Array, i, batch_size: int):
  """``(x, y, mask)``: evaluation batch ``i``, the last one padded (by repeating the last example) and masked."""
  n = images.shape[0]
  pos = i * batch_size + jnp.arange(batch_size)
  idx = jnp.minimum(pos, n - 1)
  return as_float_images(jnp.take(images, idx, axis=0)), jnp.take(labels, idx, axis=0), pos < n


def train_step(
  state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> tuple[TrainState, Metrics]:
  """One SGD step on the mean cross-entropy; batch statistics come back through ``mutable``.

  ``mask`` (per example, bool) marks the real examples of a padded batch: padding is left out of the
  batch-norm statistics (the model must accept ``mask=``, as :class:`bnjax.models.LeNet` does), the
  loss and the metrics, so a padded batch gives the numbers of the unpadded one.
  """
  images = as_float_images(images)

  def loss_fn(params):
    kwargs = {} if mask is None else {"mask": mask}
    logits, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"], **kwargs
    )
    loss, loss_sum = cross_entropy(logits, labels, mask)
    return loss, (updates.get("batch_stats", {}), logits, loss_sum)

  grads, (batch_stats, logits, loss_sum) = jax.grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, _batch_metrics(logits, labels, loss_sum, mask)


def _gather_step(state, metrics, images, labels, perm, start, batch_size, valid=None):
  """One step on the batch at ``start`` of ``perm`` (padded and masked when ``valid`` is given)."""
  idx, mask = batch_indices(perm, start, batch_size, valid)
  state, m = train_step(state, jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0), mask)
  return state, _add(metrics, m)


@functools.partial(jax.jit, static_argnames=("batch_size",), donate_argnums=(0, 1))
def _jit_step(state, metrics, images, labels, perm, start, batch_size):
  return _gather_step(state, metrics, images, labels, perm, start, batch_size)


@functools.partial(jax.jit, static_argnames=("batch_size",), donate_argnums=(0, 1))
def _jit_padded_step(state, metrics, images, labels, perm, start, valid, batch_size):
  return _gather_step(state, metrics, images, labels, perm, start, batch_size, valid)


@functools.partial(jax.jit, static_argnames=("batch_size", "num_steps"), donate_argnums=(0, 1))
def _jit_scan(state, metrics, images, labels, perm, start, batch_size, num_steps):
  def body(carry, i):
    state, metrics = carry
    return _gather_step(state, metrics, images, labels, perm, start + i * batch_size, batch_size), None

  (state, metrics), _ = jax.lax.scan(body, (state, metrics), jnp.arange(num_steps))
  return state, metrics


def epoch_plan(num_examples: int, batch_size: int) -> list[tuple[int, int]]:
  """``(start, size)`` of each batch: full batches, then the remainder (kept, as PyTorch's loader does).

  A remainder of a single example is dropped: batch statistics over one example are degenerate (the
  variance is 0, every BN output is its bias), and PyTorch's ``nn.BatchNorm`` refuses such a batch.
  """
  plan = [(s, batch_size) for s in range(0, num_examples - batch_size + 1, batch_size)]
  if num_examples % batch_size > 1 or (num_examples % batch_size == 1 and not plan):
    plan.append((num_examples - num_examples % batch_size, num_examples % batch_size))
  return plan


def scan_chunks(num_steps: int, max_chunk: int) -> list[int]:
  """Chunk lengths covering ``num_steps``, all equal when a divisor near ``max_chunk`` exists.

  Each distinct length is a separate compiled program: 234 full batches in chunks of 47 would compile
  a 47-step and a 46-step scan, in chunks of 39 only one.
  """
  best = max(d for d in range(1, min(max_chunk, num_steps) + 1) if num_steps % d == 0) if num_steps else 0
  if best * 2 > max_chunk or best == num_steps:
    return [best] * (num_steps // best) if num_steps else []
  chunks = [max_chunk] * (num_steps // max_chunk)
  return chunks + ([num_steps % max_chunk] if num_steps % max_chunk else [])


def resolve_loop(loop: str) -> str:
  if loop not in LOOPS:
    raise ValueError(f"`loop` is {loop!r}, but should be one of {LOOPS}.")
  return "scan" if loop == "auto" else loop


def train_epoch(
  state: TrainState,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  batch_size: int,
  *,
  loop: str = "auto",
  scan_chunk: int = 47,
  on_progress: Callable[[int], None] | None = None,
  sync_every: int = 16,
) -> tuple[TrainState, Metrics]:
  """One pass over ``images``/``labels`` (device arrays; uint8 images scaled to [0, 1]) in ``key``'s order.

  Full batches run in ``lax.scan`` chunks (``loop="scan"``) or one jitted call each (``"step"``). The
  remainder batch is padded to ``batch_size`` and masked (:func:`train_step`), so its program does
  not depend on the data set's size; a remainder of one example is dropped (see :func:`epoch_plan`).
  ``on_progress(n)`` is called with the number of batches just finished; the loop waits for the
  device every ``sync_every`` steps (or every scan chunk) so that progress is real, not dispatched.
  """
  if batch_size < 1:
    raise ValueError(f"`batch_size` is {batch_size}, but should be at least 1.")
  loop = resolve_loop(loop)
  perm = jax.random.permutation(key, images.shape[0])
  metrics = zero_metrics()
  plan = epoch_plan(images.shape[0], batch_size)
  num_full = sum(size == batch_size for _, size in plan)  # the plan's full batches come first
  steps = scan_chunks(num_full, scan_chunk) if loop == "scan" else [1] * num_full
  done = 0

  def progress(n):
    if on_progress is not None and (loop == "scan" or done % sync_every == 0 or done == len(plan)):
      jax.block_until_ready(metrics)
      on_progress(n if loop == "scan" else (done - 1) % sync_every + 1)

  for n in steps:
    start = plan[done][0]
    if loop == "scan":
      state, metrics = _jit_scan(state, metrics, images, labels, perm, start, batch_size=batch_size, num_steps=n)
    else:
      state, metrics = _jit_step(state, metrics, images, labels, perm, start, batch_size=batch_size)
    done += n
    progress(n)
  if done < len(plan):
    start, size = plan[done]
    state, metrics = _jit_padded_step(state, metrics, images, labels, perm, start, size, batch_size=batch_size)
    done += 1
    progress(1)
  return state, metrics


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _jit_evaluate(state, images, labels, batch_size):
  """Evaluation metrics of the whole set in one program: a scan over batches, the last one padded and masked."""
  num_batches = -(-images.shape[0] // batch_size)

  def body(metrics, i):
    x, y, mask = eval_batch(images, labels, i, batch_size)
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
    return _add(metrics, _batch_metrics(logits, y, cross_entropy(logits, y, mask)[1], mask)), None

  metrics, _ = jax.lax.scan(body, zero_metrics(), jnp.arange(num_batches))
  return metrics


def evaluate(state: TrainState, images: jax.Array, labels: jax.Array, batch_size: int = 1000) -> Metrics:
  """Metrics in evaluation mode (running statistics), summed on the device by one compiled program."""
  if batch_size < 1:
    raise ValueError(f"`batch_size` is {batch_size}, but should be at least 1.")
  return _jit_evaluate(state, images, labels, batch_size=min(batch_size, max(images.shape[0], 1)))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return len(epoch_plan(num_examples, batch_size))
