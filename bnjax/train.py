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
import optax
from flax.training import train_state

Metrics = dict[str, jax.Array]
LOOPS = ("auto", "step", "scan")


class TrainState(train_state.TrainState):
  """Parameters, optimizer state and the model's running batch statistics."""

  batch_stats: Any


def create_train_state(model: nn.Module, key: jax.Array, learning_rate: float, sample_shape=(2, 28, 28, 1)):
  """Initializes the model (Xavier-uniform weights) and plain SGD, as the chapter does."""
  variables = model.init(key, jnp.zeros(sample_shape, jnp.float32), train=False)
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


def _batch_metrics(logits: jax.Array, labels: jax.Array, loss_sum: jax.Array) -> Metrics:
  return {
    "loss_sum": loss_sum,
    "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32),
    "count": jnp.asarray(labels.shape[0], jnp.int32),
  }


def _add(a: Metrics, b: Metrics) -> Metrics:
  return jax.tree_util.tree_map(jnp.add, a, b)


def summarize(metrics: Metrics) -> dict[str, float]:
  """Host-side averages: ``loss`` (mean per example) and ``acc``."""
  m = jax.device_get(metrics)
  count = max(int(m["count"]), 1)
  return {"loss": float(m["loss_sum"]) / count, "acc": int(m["correct"]) / count}


def train_step(state: TrainState, images: jax.Array, labels: jax.Array) -> tuple[TrainState, Metrics]:
  """One SGD step on the mean cross-entropy; batch statistics come back through ``mutable``."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(losses), (updates.get("batch_stats", {}), logits, jnp.sum(losses))

  grads, (batch_stats, logits, loss_sum) = jax.grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, _batch_metrics(logits, labels, loss_sum)


def _gather_step(state, metrics, images, labels, perm, start, batch_size):
  idx = jax.lax.dynamic_slice_in_dim(perm, start, batch_size)
  state, m = train_step(state, jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0))
  return state, _add(metrics, m)


@functools.partial(jax.jit, static_argnames=("batch_size",), donate_argnums=(0, 1))
def _jit_step(state, metrics, images, labels, perm, start, batch_size):
  return _gather_step(state, metrics, images, labels, perm, start, batch_size)


@functools.partial(jax.jit, static_argnames=("batch_size", "num_steps"), donate_argnums=(0, 1))
def _jit_scan(state, metrics, images, labels, perm, start, batch_size, num_steps):
  def body(carry, i):
    state, metrics = carry
    return _gather_step(state, metrics, images, labels, perm, start + i * batch_size, batch_size), None

  (state, metrics), _ = jax.lax.scan(body, (state, metrics), jnp.arange(num_steps))
  return state, metrics


def epoch_plan(num_examples: int, batch_size: int) -> list[tuple[int, int]]:
  """``(start, size)`` of each batch: full batches, then the remainder (kept, as PyTorch's loader does)."""
  plan = [(s, batch_size) for s in range(0, num_examples - batch_size + 1, batch_size)]
  if num_examples % batch_size:
    plan.append((num_examples - num_examples % batch_size, num_examples % batch_size))
  return plan


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
  """One pass over ``images``/``labels`` (device arrays) in an order drawn from ``key``.

  ``on_progress(n)`` is called with the number of batches just finished; the loop waits for the
  device every ``sync_every`` steps (or every scan chunk) so that progress is real, not dispatched.
  """
  if batch_size < 1:
    raise ValueError(f"`batch_size` is {batch_size}, but should be at least 1.")
  loop = resolve_loop(loop)
  perm = jax.random.permutation(key, images.shape[0])
  metrics = zero_metrics()
  plan = epoch_plan(images.shape[0], batch_size)
  num_full = images.shape[0] // batch_size  # the plan's full batches come first
  i = 0
  while i < len(plan):
    start, size = plan[i]
    if loop == "scan" and size == batch_size:
      n = min(scan_chunk, num_full - i)
      state, metrics = _jit_scan(state, metrics, images, labels, perm, start, batch_size=batch_size, num_steps=n)
    else:
      n = 1
      state, metrics = _jit_step(state, metrics, images, labels, perm, start, batch_size=size)
    i += n
    if on_progress is not None and (loop == "scan" or i % sync_every == 0 or i == len(plan)):
      jax.block_until_ready(metrics)
      on_progress(n if loop == "scan" else (i - 1) % sync_every + 1)
  return state, metrics


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _jit_eval(state, metrics, images, labels, start, batch_size):
  x = jax.lax.dynamic_slice_in_dim(images, start, batch_size)
  y = jax.lax.dynamic_slice_in_dim(labels, start, batch_size)
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
  loss_sum = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  return _add(metrics, _batch_metrics(logits, y, loss_sum))


def evaluate(state: TrainState, images: jax.Array, labels: jax.Array, batch_size: int = 1000) -> Metrics:
  """Metrics in evaluation mode (running statistics), summed on the device."""
  metrics = zero_metrics()
  for start, size in epoch_plan(images.shape[0], batch_size):
    metrics = _jit_eval(state, metrics, images, labels, start, batch_size=size)
  return metrics


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return len(epoch_plan(num_examples, batch_size))
