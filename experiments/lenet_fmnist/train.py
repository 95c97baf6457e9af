"""The chapter's training loop (``train_ch6``), once: linen or NNX models, one device or a mesh of devices
over one or several processes.

* A model is a pure ``apply(variables, images, *, train, mask) -> (logits, batch_stats)`` over
  ``{"params", "batch_stats"}`` (:func:`linen_apply`, :func:`nnx_apply`), carried by a
  :class:`TrainState` with plain optax SGD.
* :func:`batch_loss_and_metrics` is the loss and the metrics of one batch, the only definition.
* The data sit on the device(s) (uint8, scaled inside the step); each epoch shuffles with one
  permutation and every step gathers its batch inside the compiled program, so the hot loop makes no
  host-to-device copies. The batches run in chunks of steps inside one ``lax.scan`` (``loop="scan"``)
  or one step per call (``"step"``). An epoch with a remainder batch pads it and masks every step, so that
  all of an epoch's steps are one compiled program. Metrics accumulate on the device and are read once per
  epoch.
* Several seeds train side by side (``replicated=True``): every array of the state, the shuffle key and
  the metrics has a leading replica axis, and the same programs run over it (one compiled program for all
  seeds; the data are shared): under ``jax.vmap`` on an accelerator; on CPU one after the other, split over
  the host devices (:func:`replica_mesh`, one per core), each device training its share.
* ``ema_decay`` keeps an exponential moving average of the parameters (``ema_params``) for evaluation.
* On a mesh (:func:`bnjax.sync.make_mesh`) the same step runs inside ``shard_map``: the global batch
  is split over every device, BN layers (``axis_name=bnjax.sync.DATA``) combine their statistics over
  it, the gradient of the global mean loss is taken outside the ``shard_map`` (so JAX's transpose of
  the collectives gives exactly the one-device gradient), and loss and metrics are summed over all
  devices. Without a mesh there is no ``shard_map`` and no collective.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bnjax import sync
from experiments.lenet_fmnist.programs import ProgramStore, jax_settings, signature

if TYPE_CHECKING:
  from flax import nnx

Metrics = dict[str, jax.Array]
Apply = Callable[..., tuple[jax.Array, Any]]
LOOPS = ("auto", "step", "scan")
MESH_AXES = (sync.GROUP, sync.DATA)
# Evaluation's batch: 10,000 test images in 50 batches. On a 2-core CPU, batches of 200-256 evaluated the test set
# in 190-260 ms against 350 ms for batches of 1000, whose convolution planes (57 MB at conv1) outgrow the caches.
EVAL_BATCH_SIZE = 200
REPLICA = "replica"  # the axis of the mesh that several seeds are split over on CPU (replica_mesh)


class TrainState(train_state.TrainState):
  """Parameters, optimizer state and the model's running batch statistics (``apply_fn`` is an :data:`Apply`);
  with ``ema_decay`` > 0, also the moving average of the parameters (``ema_params``, see :func:`update_ema`)."""

  batch_stats: Any
  ema_params: Any = None
  ema_decay: float = struct.field(pytree_node=False, default=0.0)


def update_ema(ema, params, step, decay: float):
  """The parameters' moving average after ``step`` SGD steps (``ema`` started at the initial parameters).

  The rate is ``max(1 - decay, 1 / (step + 1))``: the plain average of every parameter vector so far until
  ``1 / (1 - decay)`` steps have passed, an exponential moving average over about that many steps after.
  (A plain EMA from the initial weights would keep ``decay ** step`` of them: 39% after one epoch at 0.996.)
  """
  rate = jnp.maximum(1.0 - decay, 1.0 / (jnp.asarray(step, jnp.float32) + 1.0))
  return optax.incremental_update(params, ema, rate)


def linen_apply(model: nn.Module) -> Apply:
  """A linen model (``__call__(x, train, mask=None)``) as an :data:`Apply`."""

  def apply(variables, images, *, train: bool, mask=None):
    if not train:
      return model.apply(variables, images, train=False), variables.get("batch_stats", {})
    logits, updates = model.apply(variables, images, train=True, mask=mask, mutable=["batch_stats"])
    return logits, updates.get("batch_stats", {})

  return apply


def nnx_apply(model: nnx.Module) -> Apply:
  """An NNX model (``__call__(x, mask=None)``, ``train()``/``eval()``) as an :data:`Apply`.

  The model's graph is fixed here; each call merges it with the given variables (same names as the
  linen model's: ``params/<layer>/...`` and ``batch_stats/<layer>/...``) into a fresh model, so the
  call is pure and the NNX model trains in the same compiled loop as the linen one.
  """
  from flax import nnx  # (here: a linen run never imports flax.nnx)

  graphdef, state = nnx.split(model)
  treedef = jax.tree.structure(nnx.to_pure_dict(state))

  def apply(variables, images, *, train: bool, mask=None):
    layers: dict[str, dict] = {}
    for collection in ("params", "batch_stats"):
      for name, values in variables.get(collection, {}).items():
        layers.setdefault(name, {}).update(values)
    if jax.tree.structure(layers) != treedef:
      raise ValueError(
        f"`variables` has layers {jax.tree.structure(layers)}, but the NNX model has {treedef}; they must match."
      )
    fresh = nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(layers)))
    fresh.train() if train else fresh.eval()
    logits = fresh(images, mask=mask) if train and mask is not None else fresh(images)
    stats = nnx.to_pure_dict(nnx.state(fresh, nnx.BatchStat))
    return logits, stats

  return apply


def init_run(
  init: Callable[[jax.Array], dict],
  seed: int | list[int],
  store: ProgramStore | None = None,
  prepared: concurrent.futures.Future | None = None,
) -> tuple[dict, jax.Array]:
  """``(variables, shuffle_key)`` for a run's ``seed``: the chapter's key split and ``init(init_key)``, in one
  compiled program (the key made from a uint32 seed inside it is the one ``jax.random.key(seed)`` gives).

  With a list of seeds, the replicas' variables and keys stacked along a leading axis (``jax.vmap`` of the
  same program: each replica's are exactly its single seed's).

  ``store``: the compiled program is loaded from it when it is there, and saved to it when it is not (the
  store's context must name ``init``'s model). ``prepared``: the program, from :func:`prepare_init`.
  """
  prepared = prepared or prepare_init(init, seed, store)
  result = prepared.result()(_init_program(seed)[1])
  return place_replicas(result) if isinstance(seed, (list, tuple)) else result


def prepare_init(
  init: Callable[[jax.Array], dict], seed: int | list[int], store: ProgramStore | None = None
) -> concurrent.futures.Future:
  """The future of :func:`init_run`'s compiled program: loaded from ``store``, or traced here and compiled in
  the compile queue (:func:`compile_queue`), where whatever is queued after it waits for a free core.

  The program runs once per run, so it is compiled for compilation time, not speed (:func:`init_options`).
  """
  program, arg = _init_program(seed)
  spec = jax.ShapeDtypeStruct(arg.shape, arg.dtype)
  if store is None:
    return _init_future(program, init, spec)
  key = store.key("init", {"replicas": np.shape(arg)}, (spec,))
  compiled = store.load(key, (spec,), jax.tree.structure(init_run_shapes(init, seed)))
  if compiled is not None:
    return _done(compiled)
  return compile_queue().submit(store.compile, key, program.lower(init, spec), init_options())


def init_run_shapes(init: Callable[[jax.Array], dict], seed: int | list[int]):
  """The shapes and dtypes of :func:`init_run`'s result, with nothing compiled or computed."""
  program, arg = _init_program(seed)
  return jax.eval_shape(program, init, arg)


def _init_program(seed):
  if isinstance(seed, (list, tuple)):
    return _init_runs, np.asarray(seed, np.uint32)
  return _init_run, np.uint32(seed)


@functools.lru_cache(maxsize=16)
def _init_future(program, init, arg: jax.ShapeDtypeStruct) -> concurrent.futures.Future:
  future = compile_queue().submit(functools.partial(program.lower(init, arg).compile, compiler_options=init_options()))
  future.add_done_callback(lambda f: f.exception() is not None and _init_future.cache_clear())  # (not kept: retried)
  return future


def _done(value) -> concurrent.futures.Future:
  future = concurrent.futures.Future()
  future.set_result(value)
  return future


@functools.cache
def compile_queue() -> concurrent.futures.ThreadPoolExecutor:
  """The threads XLA compiles in, one per core: programs compile in the order they are queued (the order a run
  needs them), each with a core to itself, and the first ones finish first. (One thread per program had all
  of them share the cores and finish late together: the initialization, needed first, among them.)"""
  return concurrent.futures.ThreadPoolExecutor(usable_cores(), thread_name_prefix="compile")


def usable_cores() -> int:
  """The CPU cores this process may run on (its affinity, where the OS tells it), at least 1."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return cores or 1


def init_options() -> dict:
  """The initialization's compiler options: no backend optimizations, and on CPU XLA's older elementwise emitters
  instead of its MLIR fusion emitters, which set up an MLIR context for every program. The values are the same
  bits (tested); on a 2-core CPU LeNet's initialization compiles in 0.25 s against 2.3 s with the defaults and
  0.58 s with only the first, runs in 3 ms, and leaves the cores to the training program compiling beside it."""
  if jax.default_backend() == "cpu":
    return {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
  return {"xla_backend_optimization_level": 0}


def _init_one(init, seed):
  init_key, shuffle_key = jax.random.split(jax.random.key(seed))
  return init(init_key), shuffle_key


_init_run = jax.jit(_init_one, static_argnums=0)
_init_runs = jax.jit(jax.vmap(_init_one, in_axes=(None, 0)), static_argnums=0)


@functools.lru_cache
def sgd(learning_rate: float) -> optax.GradientTransformation:
  """The chapter's optimizer, one object per rate: states made by separate calls share their static fields,
  so they run (and :func:`compile_ahead` compiles) the same programs."""
  return optax.sgd(learning_rate)


def create_train_state(
  apply_fn: Apply, variables: dict, learning_rate: float, *, ema_decay: float = 0.0, replicated: bool = False
) -> TrainState:
  """Plain SGD, as the chapter does, over ``variables`` (``{"params"[, "batch_stats"]}``); ``replicated``:
  ``variables`` are several replicas' stacked along a leading axis (:func:`init_run` with a list of seeds)."""
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"`ema_decay` is {ema_decay}, but should lie in [0, 1) (0: no moving average).")

  def create(variables):
    return TrainState.create(
      apply_fn=apply_fn,
      params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      tx=sgd(learning_rate),
      # A copy: the training step donates its state's buffers, and one buffer must not be donated twice.
      ema_params=jax.tree.map(jnp.copy, variables["params"]) if ema_decay else None,
      ema_decay=ema_decay,
    )

  return place_replicas(jax.vmap(create)(variables)) if replicated else create(variables)


def batch_loss_and_metrics(logits, labels, mask=None, axis_names=None) -> tuple[jax.Array, Metrics]:
  """``(mean cross-entropy, metrics)`` over the real examples (all, or those where ``mask``).

  ``metrics`` are sums (``loss_sum``, ``correct``, ``count``); with ``axis_names`` (inside
  ``shard_map``) they are summed over those mesh axes first, so the loss is the global batch's mean.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  hits = jnp.argmax(logits, -1) == labels
  if mask is not None:
    losses, hits = jnp.where(mask, losses, 0.0), hits & mask
  metrics = {
    "loss_sum": jnp.sum(losses),
    "correct": jnp.sum(hits).astype(jnp.int32),
    "count": jnp.asarray(labels.shape[0] if mask is None else jnp.sum(mask), jnp.int32),
  }
  if axis_names:
    metrics = jax.lax.psum(metrics, axis_names)
  elif mask is None:  # the chapter's mean, spelled as it was: the same gradients to the last bit
    return jnp.mean(losses), metrics
  return metrics["loss_sum"] / jnp.maximum(metrics["count"], 1), metrics


def zero_metrics() -> Metrics:
  return {
    "loss_sum": jnp.zeros((), jnp.float32),
    "correct": jnp.zeros((), jnp.int32),
    "count": jnp.zeros((), jnp.int32),
  }


def add_metrics(a: Metrics, b: Metrics) -> Metrics:
  return jax.tree.map(jnp.add, a, b)


def summarize(metrics: Metrics) -> dict:
  """Host-side averages: ``loss`` (mean per example) and ``acc``; floats, or lists of them per replica."""
  m = sync.to_host(metrics)
  count = np.maximum(m["count"].astype(np.int64), 1)
  return {"loss": (m["loss_sum"].astype(np.float64) / count).tolist(), "acc": (m["correct"] / count).tolist()}


def replica(tree, i: int):
  """Replica ``i`` of a replicated pytree (its arrays' row ``i``)."""
  return jax.tree.map(lambda a: a[i], tree)


def replica_devices(replicas: int, devices: int) -> int:
  """How many of ``devices`` CPU devices ``replicas`` seeds are split over: the most, at most one per usable core,
  that share them evenly (each device trains as many, one after the other)."""
  limit = max(1, min(replicas, devices, usable_cores()))
  return max(d for d in range(1, limit + 1) if replicas % d == 0)


def request_host_devices(replicas: int) -> None:
  """Before JAX starts its CPU backend: as many host devices as ``replicas`` seeds are best split over
  (:func:`replica_devices`), unless the user chose a number (``XLA_FLAGS``' host device count or JAX's
  ``jax_num_cpu_devices``). Too late once JAX computed anything: the devices are then the ones there are.

  On a 2-core CPU, 8 LeNet seeds trained in 5.3-5.7x one seed's time split over two host devices, against
  8.2-9.0x on one (one device's program keeps about 1.5 of the 2 cores busy)."""
  chosen = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
  platforms = os.environ.get("JAX_PLATFORMS", "")
  count = replica_devices(replicas, usable_cores())
  if chosen or jax.config.jax_num_cpu_devices >= 0 or count < 2 or (platforms and "cpu" not in platforms.split(",")):
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backends have started
    return
  _REQUESTED.append(count)


_REQUESTED: list[int] = []  # host devices request_host_devices asked JAX for (at most once: the backend starts once)


def devices_requested() -> bool:
  """Whether this process's host devices are the ones :func:`request_host_devices` asked for, not the user's: a
  later run in the same process (a notebook) does not take them for devices to train one seed on."""
  return bool(_REQUESTED)


@functools.cache
def replica_mesh(replicas: int) -> Mesh | None:
  """On CPU, the host devices ``replicas`` seeds are split over (a mesh of one axis, :data:`REPLICA`), when
  there are several (:func:`replica_devices`); None to train them on one device (on an accelerator: side by
  side, ``jax.vmap``)."""
  if replicas < 2 or jax.default_backend() != "cpu":
    return None
  devices = jax.local_devices()
  count = replica_devices(replicas, len(devices))
  return Mesh(np.array(devices[:count]), (REPLICA,)) if count > 1 else None


def place_replicas(tree):
  """A replicated pytree where the seeds' programs take it: split over :func:`replica_mesh`'s devices along the
  replica axis, or as it is on one device."""
  leaves = jax.tree.leaves(tree)
  mesh = replica_mesh(leaves[0].shape[0]) if leaves else None
  return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec(REPLICA)))


# x / 255 for every uint8 value, computed by NumPy: XLA would rewrite a division by the constant 255 as a
# multiplication by its reciprocal, which is 1 ulp off for half the values.
_PIXEL_TABLE = np.arange(256, dtype=np.float32) / np.float32(255.0)


def as_float_images(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1], bit for bit as ``input_pipeline.scale_pixels`` (a 256-entry lookup).

  Keeping the data set as uint8 on the device and scaling each batch inside the step saves three
  quarters of the data set's memory.
  """
  if images.dtype == jnp.uint8:
    return jnp.asarray(_PIXEL_TABLE)[images]
  return images


def on_mesh(fn: Callable, mesh: Mesh | None, in_specs, out_specs) -> Callable:
  """``fn(*args, axis_names)`` as a function of ``args``: plain without a mesh, a ``shard_map`` over it with one."""
  if mesh is None:
    return functools.partial(fn, axis_names=None)
  return jax.shard_map(functools.partial(fn, axis_names=MESH_AXES), mesh=mesh, in_specs=in_specs, out_specs=out_specs)


_R, _B = sync.REPLICATED, sync.BATCH


def train_step(state: TrainState, images, labels, mask=None, mesh: Mesh | None = None):
  """One SGD step on the mean cross-entropy of a (global) batch; ``(state, metrics)``.

  ``mask`` (per example) marks the real examples of a padded batch: padding is left out of the BN
  statistics, the loss and the metrics, so a padded batch gives the numbers of the unpadded one.
  """

  def local_loss(params, batch_stats, images, labels, mask, axis_names):
    variables = {"params": params, "batch_stats": batch_stats}
    logits, new_stats = state.apply_fn(variables, as_float_images(images), train=True, mask=mask)
    loss, metrics = batch_loss_and_metrics(logits, labels, mask, axis_names)
    if axis_names:  # statistics are combined within a BN group already; replicas stay equal
      new_stats = sync.average_over_groups(new_stats)
    return loss, (new_stats, metrics)

  loss = on_mesh(local_loss, mesh, (_R, _R, _B, _B, _B), (_R, (_R, _R)))
  grads, (batch_stats, metrics) = jax.grad(lambda p: loss(p, state.batch_stats, images, labels, mask), has_aux=True)(
    state.params
  )
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.ema_decay:
    state = state.replace(ema_params=update_ema(state.ema_params, state.params, state.step, state.ema_decay))
  return state, metrics


def batch_indices(perm: jax.Array, start, batch_size: int, masked: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """Indices ``perm[start : start + batch_size]`` and, when ``masked``, the mask of those inside ``perm``.

  Positions past the end of ``perm`` (the last batch's padding) wrap around: any real example will do as
  padding, it is masked.
  """
  if not masked:
    return jax.lax.dynamic_slice_in_dim(perm, start, batch_size), None
  pos = start + jnp.arange(batch_size)
  return perm[pos % perm.shape[0]], pos < perm.shape[0]


def over_replicas(fn: Callable, replicated: bool, in_axes) -> Callable:
  """``fn`` as it is, or mapped over the replica axis of the arguments whose ``in_axes`` is 0.

  On accelerators the replicas run side by side (``jax.vmap``: one wide computation). On CPU they run one
  after the other (``jax.lax.map``): each replica's activations stay in the caches, where side by side they
  would need the replica count times the memory traffic; with several host devices (:func:`replica_mesh`)
  each device runs its share of them so, in a ``shard_map`` (nothing is exchanged between devices).
  """
  if not replicated:
    return fn
  if jax.default_backend() != "cpu":
    return jax.vmap(fn, in_axes=in_axes)

  def axes_of(args):
    return in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)

  def sequential(*args):
    axes = axes_of(args)

    def one(mapped):
      rows = iter(mapped)
      return fn(*[next(rows) if axis == 0 else a for a, axis in zip(args, axes, strict=True)])

    return jax.lax.map(one, [a for a, axis in zip(args, axes, strict=True) if axis == 0])

  def split(*args):
    axes = axes_of(args)
    mapped = [a for a, axis in zip(args, axes, strict=True) if axis == 0]
    mesh = replica_mesh(jax.tree.leaves(mapped)[0].shape[0])
    if mesh is None:
      return sequential(*args)
    specs = tuple(PartitionSpec(REPLICA) if axis == 0 else PartitionSpec() for axis in axes)
    # (check_vma off: the replicas exchange nothing, and the closed-over batch index is the same on every device)
    shares = jax.shard_map(sequential, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(REPLICA), check_vma=False)
    return shares(*args)

  return split


# (program, static arguments, argument structure and types) -> the future of its jax.stages.Compiled, compiled
# ahead or loaded from a ProgramStore by compile_ahead. Other calls go through the jitted function itself.
_PREPARED: dict[tuple, concurrent.futures.Future] = {}
_MAX_PREPARED = 64


def clear_compiled_ahead() -> None:
  """Forgets the programs :func:`compile_ahead` prepared (as ``jax.clear_caches`` does JAX's own)."""
  _PREPARED.clear()


def _program_key(program: Callable, static: dict, args: tuple) -> tuple:
  # (JAX's settings too: a call under e.g. jax.default_matmul_precision(...) is not the program prepared without it)
  return program, tuple(sorted(static.items())), jax.tree.structure(args), signature(args), jax_settings()


def _call(program: Callable, *args, **static):
  """``program(*args, **static)``, by the program :func:`compile_ahead` prepares for these arguments if any
  (waiting for it when it is still compiling)."""
  prepared = _PREPARED.get(_program_key(program, static, args))
  if prepared is None or prepared.exception() is not None:  # (a failed compilation raises its error below)
    return program(*args, **static)
  return prepared.result()(*args)


@functools.partial(
  jax.jit, static_argnames=("batch_size", "num_steps", "masked", "mesh", "replicated"), donate_argnums=(0, 1)
)
def _train_steps(state, metrics, images, labels, perm, start, *, batch_size, num_steps, masked, mesh, replicated):
  """``num_steps`` consecutive batches of ``perm`` from ``start`` in one program; ``masked``: every batch
  masked, a batch running past the end of ``perm`` padded to ``batch_size`` (see :func:`epoch_calls`)."""

  def steps(state, metrics, perm):
    def step(carry, i):
      state, metrics = carry
      idx, mask = batch_indices(perm, start + i * batch_size, batch_size, masked)
      if mesh is not None and mask is None:
        mask = jnp.ones((batch_size,), bool)  # shards of a global batch are always masked (one program)
      state, m = train_step(state, jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0), mask, mesh)
      return (state, add_metrics(metrics, m)), None

    if num_steps == 1:
      return step((state, metrics), 0)[0]
    return jax.lax.scan(step, (state, metrics), jnp.arange(num_steps))[0]

  return over_replicas(steps, replicated, (0, 0, 0))(state, metrics, perm)


def epoch_plan(num_examples: int, batch_size: int) -> list[tuple[int, int]]:
  """``(start, size)`` of each batch: full batches, then the remainder (kept, as PyTorch's loader does).

  A remainder of a single example is dropped: batch statistics over one example are degenerate (the
  variance is 0, every BN output is its bias), and PyTorch's ``nn.BatchNorm`` refuses such a batch.
  """
  plan = [(s, batch_size) for s in range(0, num_examples - batch_size + 1, batch_size)]
  if num_examples % batch_size > 1 or (num_examples % batch_size == 1 and not plan):
    plan.append((num_examples - num_examples % batch_size, num_examples % batch_size))
  return plan


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return len(epoch_plan(num_examples, batch_size))


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


class Data(NamedTuple):
  """Images and labels where the loop reads them: on the device, or replicated over a mesh's devices."""

  images: jax.Array
  labels: jax.Array

  @classmethod
  def put(cls, images, labels, mesh: Mesh | None = None) -> Data:
    if mesh is None:
      return cls(*jax.device_put((images, labels)))  # (jnp.asarray would compile a program per shape)
    return cls(*sync.replicate((images, labels), mesh))


def place(tree, mesh: Mesh | None):
  """Host values where the loop's programs take them: as they are, or replicated over the mesh."""
  return tree if mesh is None else sync.replicate(tree, mesh)


@functools.partial(jax.jit, static_argnames=("num", "replicated"))
def _epoch_start(key, epoch, *, num, replicated):
  """The epoch's order (``key``, with ``epoch`` folded in when given) and zero metrics: one program."""

  def start(key):
    if epoch is not None:
      key = jax.random.fold_in(key, epoch)
    return jax.random.permutation(key, num), zero_metrics()

  return over_replicas(start, replicated, 0)(key)


def epoch_calls(
  num: int, batch_size: int, loop: str = "auto", scan_chunk: int = 47
) -> tuple[list[tuple[int, int]], bool]:
  """``(calls, masked)``: the ``(num_steps, start)`` of each ``_train_steps`` call of an epoch over ``num``
  examples, its batches in scan chunks (or one per call with ``loop="step"``), and whether they are masked.

  They are when the epoch ends with a remainder batch: every step then masks, the remainder's padding and
  nothing in a full batch, so that the remainder runs in the same compiled program as the full batches: one
  program to compile instead of two, for about 2% more time a step on LeNet.
  """
  if batch_size < 1:
    raise ValueError(f"`batch_size` is {batch_size}, but should be at least 1.")
  if loop not in LOOPS:
    raise ValueError(f"`loop` is {loop!r}, but should be one of {LOOPS}.")
  plan = epoch_plan(num, batch_size)
  calls, done = [], 0
  for n in [1] * len(plan) if loop == "step" else scan_chunks(len(plan), scan_chunk):
    calls.append((n, done * batch_size))
    done += n
  return calls, any(size < batch_size for _, size in plan)


def train_epoch(
  state: TrainState,
  data: Data,
  key: jax.Array,
  batch_size: int,
  *,
  epoch: int | None = None,
  mesh: Mesh | None = None,
  loop: str = "auto",
  scan_chunk: int = 47,
  on_progress: Callable[[int], None] | None = None,
  sync_every: int = 16,
  replicated: bool = False,
) -> tuple[TrainState, Metrics]:
  """One pass over ``data`` in ``key``'s order (the same order on one device or a mesh); with ``epoch``,
  in the order of ``fold_in(key, epoch)``. ``replicated``: ``state`` and ``key`` hold several replicas
  (seeds) along a leading axis, each trained in its own order; metrics come back per replica.

  ``on_progress(n)`` is called with the number of batches just finished; the loop waits for the
  device every ``sync_every`` steps (or every scan chunk) so that progress is real, not dispatched.
  """
  num = data.labels.shape[0]
  calls, masked = epoch_calls(num, batch_size, loop, scan_chunk)
  check_replicas(mesh, replicated)
  if mesh is not None:
    sync.check_divisible(mesh, batch_size)
  perm, metrics = _call(_epoch_start, key, epoch, num=num, replicated=replicated)
  if mesh is not None:
    perm, metrics = place(jax.device_get((perm, metrics)), mesh)
  pending = 0  # batches dispatched since progress was last reported
  for i, (n, start) in enumerate(calls):
    state, metrics = _call(
      _train_steps,
      state,
      metrics,
      *data,
      perm,
      place(np.int32(start), mesh),
      batch_size=batch_size,
      num_steps=n,
      masked=masked,
      mesh=mesh,
      replicated=replicated,
    )
    pending += n
    if on_progress is not None and (n > 1 or pending >= sync_every or i == len(calls) - 1):
      jax.block_until_ready(metrics)
      on_progress(pending)
      pending = 0
  return state, metrics


def compile_ahead(
  state: TrainState,
  train_data: Data,
  test_data: Data | None,
  batch_size: int,
  *,
  loop: str = "auto",
  scan_chunk: int = 47,
  replicated: bool = False,
  eval_batch_size: int = EVAL_BATCH_SIZE,
  store: ProgramStore | None = None,
  then: Callable[[], Any] | None = None,
) -> list[concurrent.futures.Future]:
  """Traces every program an epoch and its evaluation run and queues each for compilation (:func:`compile_queue`)
  in the order an epoch needs them; returns their futures. ``then`` is called once the first training program
  (the longest to compile) is queued: the caller queues there what it needs before the rest (its
  initialization). Later calls of :func:`train_epoch` and
  :func:`evaluate` with these shapes (and the same JAX settings) run them. XLA compiles without holding
  Python's lock, so the programs compile side by side and beside whatever the caller does meanwhile
  (initialization, training the first chunks while the evaluation's program still compiles).

  ``state`` may be abstract (``jax.eval_shape`` of the state-making function): nothing is computed. One
  device, or the host devices several seeds are split over (a data-parallel mesh's programs compile on first
  use). ``store``: programs found in it are loaded instead
  of traced and compiled, and the others are saved to it (its context must name the state's model).
  """

  def spec(a):
    return jax.ShapeDtypeStruct(np.shape(a), a.dtype, weak_type=getattr(a, "weak_type", False))

  state, train_data = jax.tree.map(spec, state), jax.tree.map(spec, train_data)
  num = train_data.labels.shape[0]
  replicas = jax.tree.leaves(state)[0].shape[:1] if replicated else ()
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(replicas + key.shape, key.dtype)
  epoch = jax.ShapeDtypeStruct((), jnp.int32, weak_type=True)  # a Python int, as train_epoch passes it
  perm, metrics = jax.eval_shape(functools.partial(_epoch_start, num=num, replicated=replicated), key, epoch)
  perm, metrics = jax.tree.map(spec, (perm, metrics))
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  # (program, arguments, static arguments, the structure of its result)
  steps = []
  # Each call shape once, in the order an epoch runs them (its first, the longest to compile, first).
  calls, masked = epoch_calls(num, batch_size, loop, scan_chunk)
  for n in dict.fromkeys(n for n, _ in calls):
    args = (state, metrics, *train_data, perm, scalar)
    static = dict(batch_size=batch_size, num_steps=n, masked=masked, mesh=None, replicated=replicated)
    steps.append((_train_steps, args, static, (state, metrics)))
  start = (_epoch_start, (key, epoch), dict(num=num, replicated=replicated), (perm, metrics))
  programs = [*steps[:1], start, *steps[1:]]  # the first training program, the longest, first
  if test_data is not None:
    test_data = jax.tree.map(spec, test_data)
    size = eval_batch_size_for(eval_batch_size, test_data.labels.shape[0], mesh=None)
    static = dict(batch_size=size, mesh=None, replicated=replicated)
    programs.append((_evaluate, (state, *test_data), static, metrics))

  mesh = replica_mesh(replicas[0]) if replicas else None
  devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]  # where the programs run
  futures = []
  for program, args, static, result in programs:
    # Keys, loads and tracing happen here, in the caller's thread under its JAX settings; only XLA's compilation
    # (which releases Python's lock) runs in the threads, each program's as soon as it is traced.
    key = store.key(program.__name__, {**static, "devices": len(devices)}, args) if store else None
    compiled = store.load(key, args, jax.tree.structure(result), devices) if store else None
    if compiled is not None:
      futures.append(_done(compiled))
    else:
      lowered = program.lower(*args, **static)
      futures.append(compile_queue().submit(*((store.compile, key, lowered) if store else (lowered.compile,))))
    while len(_PREPARED) >= _MAX_PREPARED:
      _PREPARED.pop(next(iter(_PREPARED)))
    _PREPARED[_program_key(program, static, args)] = futures[-1]
    if then is not None and len(futures) == 1:
      then()
  return futures


def eval_batch(images: jax.Array, labels: jax.Array, i, batch_size: int):
  """``(x, y, mask)``: evaluation batch ``i``, the last one padded (by repeating the last example) and masked."""
  n = images.shape[0]
  pos = i * batch_size + jnp.arange(batch_size)
  idx = jnp.minimum(pos, n - 1)
  return jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0), pos < n


def check_replicas(mesh: Mesh | None, replicated: bool) -> None:
  if replicated and mesh is not None:
    raise ValueError(
      "`replicated` (several seeds side by side) does not combine with a data-parallel mesh; pass `mesh=None`."
    )


@functools.partial(jax.jit, static_argnames=("batch_size", "mesh", "replicated"))
def _evaluate(state, images, labels, *, batch_size, mesh, replicated):
  """Evaluation metrics of the whole set in one program: a scan over batches, the last one padded and masked."""

  def local_metrics(params, batch_stats, x, y, mask, axis_names):
    logits, _ = state.apply_fn({"params": params, "batch_stats": batch_stats}, as_float_images(x), train=False)
    return batch_loss_and_metrics(logits, y, mask, axis_names)[1]

  metrics_of = on_mesh(local_metrics, mesh, (_R, _R, _B, _B, _B), _R)

  def evaluate_all(params, batch_stats):
    def body(metrics, i):
      x, y, mask = eval_batch(images, labels, i, batch_size)
      return add_metrics(metrics, metrics_of(params, batch_stats, x, y, mask)), None

    return jax.lax.scan(body, zero_metrics(), jnp.arange(-(-images.shape[0] // batch_size)))[0]

  return over_replicas(evaluate_all, replicated, (0, 0))(state.params, state.batch_stats)


def eval_batch_size_for(batch_size: int, num: int, mesh: Mesh | None) -> int:
  """The evaluation batch :func:`evaluate` uses for ``num`` examples: at most the set, and on a mesh a whole
  number of examples per device."""
  batch_size = min(batch_size, max(num, 1))
  if mesh is not None:
    batch_size = -(-batch_size // mesh.size) * mesh.size
  return batch_size


def evaluate(
  state: TrainState,
  data: Data,
  batch_size: int = EVAL_BATCH_SIZE,
  *,
  mesh: Mesh | None = None,
  replicated: bool = False,
) -> Metrics:
  """Metrics in evaluation mode (running statistics), summed on the device by one compiled program
  (per replica when ``replicated``)."""
  if batch_size < 1:
    raise ValueError(f"`batch_size` is {batch_size}, but should be at least 1.")
  check_replicas(mesh, replicated)
  batch_size = eval_batch_size_for(batch_size, data.labels.shape[0], mesh)
  return _call(_evaluate, state, *data, batch_size=batch_size, mesh=mesh, replicated=replicated)
