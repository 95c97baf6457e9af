"""What a variant is evaluated with: its weights or their moving average (EMA), its BN statistics or precise BN's.

The policy (:func:`precise_batches`, :func:`ema_decay`) reads the variant and the flags; :func:`state_to_evaluate`
applies it after every epoch, with :func:`precise_stats` recomputing the statistics for the weights evaluated.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import precise_batch_stats, sync
from experiments.lenet_fmnist import train
from experiments.lenet_fmnist.checkpoint import RunError
from experiments.lenet_fmnist.config import DEFAULT_EMA_DECAY, DEFAULT_PRECISE_BATCHES, RunConfig


def precise_batches(norm: str, config: RunConfig) -> int:
  """How many batches precise BN uses before every evaluation of this variant (0: off). Averaged weights
  (``ours-ema``, ``--ema``) always get statistics of their own: the running averages belong to other weights."""
  if norm == "none":
    return 0
  recompute = norm in ("ours-precise", "ours-ema") or ema_decay(norm, config) > 0
  return config.precise_bn or (DEFAULT_PRECISE_BATCHES if recompute else 0)


def ema_decay(norm: str, config: RunConfig) -> float:
  """The decay of the weights' moving average this variant is evaluated with (0: the weights themselves)."""
  return config.ema or (DEFAULT_EMA_DECAY if norm == "ours-ema" else 0.0)


def check_one_full_batch(n_train: int, batch_size: int) -> None:
  """Precise BN draws whole batches: with fewer training examples than one, it has none."""
  if n_train < batch_size:
    raise RunError(
      f"precise BN needs at least one full batch of {batch_size} training examples, but there are "
      f"{n_train}; lower --batch-size."
    )


def precise_stats(apply, variables, images, num_batches: int, batch_size: int, shuffle_key, epoch: int, seeds=1):
  """Precise BN for the chapter: ``num_batches`` random training batches, weights frozen, population statistics.

  ``apply`` is the (one-device) model's apply function on uint8 images; pass the same one every epoch,
  so that the compiled program is reused. ``images`` are the host's; every process computes the same.
  With ``seeds`` > 1, ``variables`` and ``shuffle_key`` hold that many replicas: each gets its own
  statistics, from its own batches, in one program over the replicas (as the training steps run them).
  """
  check_one_full_batch(images.shape[0], batch_size)
  if seeds > 1:  # (the examples' indices per seed: the program gathers the batches, the host holds one set of images)
    picks = np.stack(
      [precise_picks(images.shape[0], num_batches, batch_size, shuffle_key[i], epoch) for i in range(seeds)]
    )
    return _replicas_stats(apply, batch_size)(variables, np.asarray(images), picks)
  batches = np.asarray(images)[precise_picks(images.shape[0], num_batches, batch_size, shuffle_key, epoch)]
  batches = batches.reshape(-1, batch_size, *images.shape[1:])
  return precise_batch_stats(apply, variables, batches, model_kwargs={"train": True})["batch_stats"]


def precise_picks(num: int, num_batches: int, batch_size: int, shuffle_key, epoch: int) -> np.ndarray:
  """The indices of precise BN's examples for an epoch, whole batches of them: an order of the ``num`` training
  examples drawn from the run's shuffle key, a different stream from the epoch's shuffle (``fold_in`` of a second
  index) and fixed per epoch: reproducible."""
  count = min(num_batches * batch_size, num) // batch_size * batch_size
  perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(shuffle_key, epoch), 1), num)
  return np.asarray(perm[:count])


@functools.lru_cache(maxsize=8)
def _replicas_stats(apply, batch_size: int):
  """Precise BN of every replica in one compiled program, each from its own examples of the images (``picks``:
  indices per replica), gathered inside it (``train.over_replicas``: on CPU one replica after the other on each
  of the seeds' host devices, side by side on an accelerator)."""

  def one(variables, images, picks):
    batches = jnp.take(images, picks, axis=0).reshape(-1, batch_size, *images.shape[1:])
    return precise_batch_stats(apply, variables, batches, model_kwargs={"train": True})["batch_stats"]

  return jax.jit(train.over_replicas(one, True, (0, None, 0)))


def state_to_evaluate(
  state, *, precise: int, ema: float, apply, images, batch_size: int, shuffle_key, epoch: int, seeds: int, mesh
):
  """``(state, evaluated, seconds)`` after an epoch: the weights evaluated (the state's, or their moving
  average with ``ema``), with precise BN's statistics from ``precise`` batches of ``images`` when not 0, and
  the seconds precise BN took (``seeds``: how many replicas ``state`` holds, as in :func:`precise_stats`).
  Without ``ema`` the state keeps the recomputed statistics, so that its checkpoint evaluates to the numbers
  reported.
  """
  evaluated = state.replace(params=state.ema_params) if ema else state
  if not precise:
    return state, evaluated, 0.0
  t1 = time.perf_counter()
  now = sync.to_host(evaluated) if mesh is not None else evaluated
  variables = {"params": now.params, "batch_stats": now.batch_stats}
  stats = precise_stats(apply, variables, images, precise, batch_size, shuffle_key, epoch, seeds)
  stats = jax.block_until_ready(stats)  # (dispatch is asynchronous: time the work)
  evaluated = evaluated.replace(batch_stats=train.place(sync.to_host(stats), mesh) if mesh is not None else stats)
  seconds = time.perf_counter() - t1
  return (state if ema else evaluated), evaluated, seconds
