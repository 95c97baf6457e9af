"""Data-parallel training gives the one-device numbers: 4 host devices in this process, and 2 processes x 2
devices on 127.0.0.1 (subprocesses, a free port, bounded by timeouts); faults end in one clear line."""

import functools
import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import sync
from experiments.lenet_fmnist import train
from experiments.lenet_fmnist.checkpoint import read_checkpoint
from experiments.lenet_fmnist.models import LeNet
from tests.experiments import helpers
from tests.experiments.helpers import cli_command, host_devices_env, make_fmnist_dir, new_state, start_cli
from tests.helpers import CPU_DEVICES, ROOT
from tests.tolerance import assert_close_and_record

STEPS, BATCH = 5, 64
step_fn = jax.jit(train.train_step, static_argnames="mesh")


def make_mesh(devices, bn_group_size=None):
  return sync.make_mesh(devices, bn_group_size, devices=CPU_DEVICES)


def batches(seed=0, n=STEPS * BATCH):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 28, 28, 1)).astype(np.uint8), rng.integers(0, 10, n).astype(np.int32)


def one_device_run(images, labels, masks):
  state = new_state(LeNet("ours"), jax.random.key(0), 1.0)
  losses = []
  for i, mask in enumerate(masks):
    sl = slice(i * BATCH, (i + 1) * BATCH)
    x, y, m = jnp.asarray(images[sl]), jnp.asarray(labels[sl]), jnp.asarray(mask)
    state, metrics = step_fn(state, x[m], y[m]) if mask.all() else step_fn(state, x, y, m)
    losses.append(train.summarize(metrics)["loss"])
  return state, losses


def mesh_run(mesh, images, labels, masks):
  state = sync.replicate(new_state(LeNet("ours", axis_name=sync.DATA), jax.random.key(0), 1.0), mesh)
  losses = []
  for i, mask in enumerate(masks):
    sl = slice(i * BATCH, (i + 1) * BATCH)
    state, metrics = step_fn(state, *sync.replicate((images[sl], labels[sl], mask), mesh), mesh=mesh)
    losses.append(train.summarize(metrics)["loss"])
  return sync.to_host(state), losses


def masks_with_a_padded_last_batch():
  # The last batch has 37 real examples: the 4 shards of 16 hold 16, 16, 5 and 0 of them.
  return [np.ones(BATCH, bool)] * (STEPS - 1) + [np.arange(BATCH) < 37]


@pytest.mark.slow
@pytest.mark.parametrize("devices", [4, 2])
def test_n_devices_give_the_one_device_numbers(devices):
  images, labels = batches()
  masks = masks_with_a_padded_last_batch()
  ref, ref_losses = one_device_run(images, labels, masks)
  state, losses = mesh_run(make_mesh(devices), images, labels, masks)
  check = f"parallel: {devices} devices vs 1, {STEPS} steps"
  assert_close_and_record(
    check, (losses, state.params, state.batch_stats), (ref_losses, ref.params, ref.batch_stats), "trajectory"
  )
  assert int(state.step) == STEPS


def test_one_all_reduce_per_bn_layer_in_the_forward_pass():
  images, labels = batches()
  mesh = make_mesh(4)
  state = sync.replicate(new_state(LeNet("ours", axis_name=sync.DATA), jax.random.key(0), 1.0), mesh)
  args = (state, *sync.replicate((images[:BATCH], labels[:BATCH], np.ones(BATCH, bool)), mesh))
  text = step_fn.lower(*args, mesh=mesh).compile().as_text()
  gathers = [line for line in text.splitlines() if " all-reduce(" in line and "f32[4,3," in line]
  assert len(gathers) == 4  # bn1..bn4: each shard's (count, mean, M2) in one collective
  assert sync.count_all_reduces(step_fn, *args, mesh=mesh) <= 11  # + backward BN, gradients, metrics (README)


@pytest.mark.slow
def test_bn_groups_normalize_each_group_by_its_own_statistics():
  images, labels = batches()
  mesh = make_mesh(4, bn_group_size=2)
  state, losses = mesh_run(mesh, images[:BATCH], labels[:BATCH], [np.ones(BATCH, bool)])
  # Reference on one device: each half of the batch through its own BN statistics, one SGD step on the
  # mean loss over both halves, running statistics averaged over the halves.
  model = LeNet("ours")
  ref = new_state(model, jax.random.key(0), 1.0)
  halves = jnp.asarray(train.as_float_images(images[:BATCH])).reshape(2, BATCH // 2, 28, 28, 1)
  ys = jnp.asarray(labels[:BATCH]).reshape(2, BATCH // 2)

  def loss(params):
    def half(x, y):
      logits, upd = model.apply({"params": params, "batch_stats": ref.batch_stats}, x, train=True, mutable=True)
      return train.batch_loss_and_metrics(logits, y)[1]["loss_sum"], upd["batch_stats"]

    sums, stats = jax.vmap(half)(halves, ys)
    return jnp.sum(sums) / BATCH, jax.tree.map(lambda s: jnp.mean(s, 0), stats)

  (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(ref.params)
  ref = ref.apply_gradients(grads=grads, batch_stats=stats)
  assert_close_and_record(
    "parallel: BN groups of 2 vs per-half reference",
    (losses[0], state.params, state.batch_stats),
    (value, ref.params, ref.batch_stats),
    "trajectory",
  )


def test_errors_before_any_work():
  with pytest.raises(ValueError, match=r"the global batch size 66 is not divisible by the 4 devices"):
    sync.check_divisible(make_mesh(4), 66)
  with pytest.raises(ValueError, match=r"`bn_group_size` is 3, but it should divide the number of devices, 4"):
    make_mesh(4, 3)
  with pytest.raises(
    ValueError,
    match=r"`devices_per_process` is 9, but this process has 4 local cpu device\(s\); on CPU, XLA_FLAGS=--xla_for"
    r"ce_host_platform_device_count=9",
  ):
    make_mesh(9)


# --- the CLI: one process with several devices, two processes ------------------------------------


# The CLI's arguments without --devices: every local device unless a test says otherwise.
cli = functools.partial(helpers.cli, batch_size=BATCH, devices=None)


@pytest.fixture
def five_step_data(tmp_path):
  return make_fmnist_dir(tmp_path / "fmnist", n_train=STEPS * BATCH, n_test=100)


def checkpoint(run_dir):
  raw = read_checkpoint(Path(run_dir) / "ours" / "checkpoint.msgpack")
  return raw["state"], json.loads(raw["history"])


def run_cli(*args):
  """The CLI as a process on 4 host CPU devices (JAX_PLATFORMS=cpu: the same on a GPU machine)."""
  env = host_devices_env(4)
  return subprocess.run(cli_command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_on_four_devices_matches_one_device(five_step_data, tmp_path):
  one = run_cli(*cli(five_step_data, tmp_path / "one", "--epochs", "1", "--devices", "1"))
  four = run_cli(*cli(five_step_data, tmp_path / "four", "--epochs", "1", "--devices", "4"))
  assert one.returncode == 0 and four.returncode == 0, (one.stderr[-1500:], four.stderr[-1500:])
  assert "data parallel: 4 devices (1 BN group(s) of 4), 1 process(es)" in four.stdout
  (one, h1), (four, h4) = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "four")
  assert_close_and_record("parallel: CLI 4 devices vs 1, 1 epoch", four, one, "trajectory")
  assert_close_and_record(
    "parallel: CLI 4 devices vs 1, 1 epoch",
    [h4[0]["train_loss"], h4[0]["test_acc"]],
    [h1[0]["train_loss"], h1[0]["test_acc"]],
    "trajectory",
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "extra,message",
  [
    (["--devices", "4", "--batch-size", "66"], r"error: --batch-size 66 is not divisible by the 4 devices"),
    (["--devices", "9"], r"error: --devices is 9, but this process has 4 local cpu device"),
    (["--devices", "4", "--bn-group-size", "3"], r"error: --bn-group-size is 3, but it should divide"),
  ],
)
def test_cli_refuses_what_it_cannot_do_before_any_work(five_step_data, tmp_path, extra, message):
  result = run_cli(*cli(five_step_data, tmp_path / "o", *extra))
  assert result.returncode == 1 and re.search(message, result.stderr), result.stderr[-1500:]
  assert "Traceback" not in result.stderr and not (tmp_path / "o" / "ours" / "checkpoint.msgpack").exists()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_processes(data_dir, out, num_processes, *extra, ids=None):
  """Starts the CLI as `num_processes` processes with 2 host devices each; returns the Popen objects."""
  env = host_devices_env(2)
  coordinator = f"127.0.0.1:{free_port()}"
  procs = []
  for i in ids if ids is not None else range(num_processes):
    args = [*cli(data_dir, out, *extra), "--coordinator", coordinator, "--num-processes", str(num_processes)]
    procs.append(start_cli([*args, "--process-id", str(i)], env))
  return procs


def finish(procs, timeout):
  results = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"a process did not finish within {timeout} s")
    results.append((p.returncode, out, err))
  return results


@pytest.mark.slow
def test_two_processes_match_one_device_and_resume(five_step_data, tmp_path):
  from experiments import lenet_fmnist

  lenet_fmnist.main(cli(five_step_data, tmp_path / "one", "--epochs", "2", "--devices", "1"))
  procs = launch_processes(five_step_data, tmp_path / "two", 2, "--epochs", "1", "--timeout", "60")
  results = finish(procs, timeout=240)
  for code, _out, err in results:
    assert code == 0, err[-2000:]
  assert "data parallel: 4 devices (1 BN group(s) of 4), 2 process(es)" in results[0][1]
  assert "test acc" in results[0][1] and results[1][1] == ""  # only process 0 prints
  one_epoch_1 = read_checkpoint(tmp_path / "one" / "ours" / "checkpoint.msgpack")
  # Epoch 1 of the 2-process run against the one-device run's epoch 1 (its history), then resume to epoch 2.
  two, h2 = checkpoint(tmp_path / "two")
  _, h1 = checkpoint(tmp_path / "one")
  assert_close_and_record(
    "parallel: 2 processes x 2 devices vs 1 device", h2[0]["train_loss"], h1[0]["train_loss"], "trajectory"
  )
  results = finish(
    launch_processes(five_step_data, tmp_path / "two", 2, "--epochs", "2", "--resume", "--timeout", "60"), timeout=240
  )
  for code, _out, err in results:
    assert code == 0, err[-2000:]
  assert "resumed from" in results[0][1] and "epoch  1/2" not in results[0][1]  # only epoch 2 trains
  two, h2 = checkpoint(tmp_path / "two")
  assert_close_and_record("parallel: 2 processes x 2 devices vs 1 device", two, one_epoch_1["state"], "trajectory")
  assert [h["epoch"] for h in h2] == [1, 2]


@pytest.mark.slow
def test_a_process_that_never_arrives_ends_the_others_in_bounded_time(five_step_data, tmp_path):
  t0 = time.monotonic()
  procs = launch_processes(five_step_data, tmp_path / "o", 2, "--timeout", "5", ids=[0])
  ((code, out, err),) = finish(procs, timeout=120)
  assert code != 0 and time.monotonic() - t0 < 90
  last = err.strip().splitlines()[-1]
  assert re.match(r"error: process 0 of 2 could not join the coordinator at 127\.0\.0\.1:\d+ within 5 s", last), err[
    -1500:
  ]
  assert "Traceback" not in err


@pytest.mark.slow
def test_a_process_that_dies_ends_the_others_in_bounded_time(five_step_data, tmp_path):
  procs = launch_processes(five_step_data, tmp_path / "o", 2, "--epochs", "200", "--timeout", "60")
  try:
    deadline = time.monotonic() + 180
    seen = ""
    while "epoch  1/200" not in seen:  # process 0 has finished a whole epoch with its peer
      assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()[-2000:]
      seen += procs[0].stdout.readline()
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=180)
  finally:
    for p in procs:
      p.kill()
  # Status 3 however the survivor learns of the death (its watchdog, or a failed collective), never the
  # runtime's C++ abort at shutdown (status 134, "Check failure stack trace").
  assert procs[0].returncode == 3 and time.monotonic() - killed < 150, err[-2000:]
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert errors and ("no progress for 60 s" in errors[-1] or "a collective operation failed" in errors[-1]), err[-2000:]
  assert "Traceback" not in err and "Check failure" not in err


@pytest.mark.slow
@pytest.mark.parametrize(
  "other,said",
  [
    (["--seed", "1"], r"seed 1 \(process 0: 0\)"),
    (["--lr", "0.1"], r"lr 0.1 \(process 0: 1.0\)"),
    (["--epochs", "3"], r"epochs 3 \(process 0: 10\)"),  # not "another process has probably died"
    ("data", r"data \d+\+\d+ examples:(\w+) \(process 0: \d+\+\d+ examples:(?!\1)\w+\)"),  # same counts
  ],
)
def test_processes_started_with_different_settings_refuse_before_any_work(five_step_data, tmp_path, other, said):
  env = host_devices_env(2)
  coordinator, procs = f"127.0.0.1:{free_port()}", []
  for i in (0, 1):
    data, extra = five_step_data, []
    if i == 1 and other == "data":  # the same counts, other images
      data = make_fmnist_dir(tmp_path / "other", n_train=STEPS * BATCH, n_test=100, seed=1)
    elif i == 1:
      extra = other
    args = cli(data, tmp_path / "o", *extra)
    args += ["--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i), "--timeout", "60"]
    procs.append(start_cli(args, env))
  for code, _out, err in finish(procs, timeout=180):
    assert code == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert re.match(rf"error: process 1 of 2 runs with {said}; ", last), err[-1500:]
  assert not (tmp_path / "o" / "ours" / "checkpoint.msgpack").exists()


@pytest.mark.slow
@pytest.mark.parametrize("devices", ["1", None], ids=["devices-1", "all-devices"])
def test_processes_with_different_local_device_counts(five_step_data, tmp_path, devices):
  # Process 0 has 2 local devices, process 1 one. With --devices 1 each trains on one: the one-device
  # numbers. With all of each (the default) they would not lay out one mesh: one line says why.
  from experiments import lenet_fmnist

  coordinator, procs = f"127.0.0.1:{free_port()}", []
  extra = ["--devices", devices] if devices else ["--batch-size", "96"]  # (96: divisible by 2 and 3 devices)
  for i, count in ((0, 2), (1, 1)):
    args = cli(five_step_data, tmp_path / "two", "--epochs", "1")
    args += [*extra, "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i), "--timeout", "60"]
    procs.append(start_cli(args, host_devices_env(count)))
  results = finish(procs, timeout=240)
  if devices is None:
    for code, _out, err in results:
      assert code == 1 and "Traceback" not in err, err[-2000:]
      last = err.strip().splitlines()[-1]
      assert re.match(r"error: process 1 of 2 runs with devices 1 \(process 0: 2\); .*--devices N", last), err[-1500:]
    return
  for code, _out, err in results:
    assert code == 0, err[-2000:]
  assert "data parallel: 2 devices (1 BN group(s) of 2), 2 process(es)" in results[0][1]
  lenet_fmnist.main(cli(five_step_data, tmp_path / "one", "--epochs", "1", "--devices", "1"))
  (two, h2), (one, h1) = checkpoint(tmp_path / "two"), checkpoint(tmp_path / "one")
  assert_close_and_record("parallel: 2 processes x 1 device vs 1 device", two, one, "trajectory")
  assert_close_and_record(
    "parallel: 2 processes x 1 device vs 1 device", h2[0]["train_loss"], h1[0]["train_loss"], "trajectory"
  )


# --- --distributed auto: the processes of a cluster job, as jax.distributed.initialize() finds them -------------


def slurm_job_id() -> int:
  """A SLURM job id whose coordinator port is free here (JAX takes the port from the id: 61440 + id % 4096)."""
  for port in np.random.default_rng().permutation(np.arange(61440, 65536)):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", int(port)))
      except OSError:
        continue
    return int(port) - 61440
  pytest.fail("no free port in 61440..65535")


def slurm_task_env(task: int, tasks: int, job_id: int) -> dict:
  """The environment `srun --ntasks=<tasks>` gives task `task` of a job on this one node (2 host devices each)."""
  return {
    **host_devices_env(2),
    "SLURM_JOB_ID": str(job_id),
    "SLURM_STEP_NODELIST": "localhost",
    "SLURM_NTASKS": str(tasks),
    "SLURM_PROCID": str(task),
    "SLURM_LOCALID": str(task),
  }


@pytest.mark.slow
def test_distributed_auto_joins_a_slurm_jobs_tasks_as_the_flags_join_processes(five_step_data, tmp_path):
  job = slurm_job_id()
  auto = [
    start_cli(
      [*cli(five_step_data, tmp_path / "auto", "--epochs", "1", "--distributed", "auto")], slurm_task_env(i, 2, job)
    )
    for i in range(2)
  ]
  results = finish(auto, timeout=240)
  for code, _out, err in results:
    assert code == 0, err[-2000:]
  assert "data parallel: 4 devices (1 BN group(s) of 4), 2 process(es)" in results[0][1]
  assert "test acc" in results[0][1] and results[1][1] == ""  # task 0 is process 0: it alone prints and writes
  assert finish(launch_processes(five_step_data, tmp_path / "flags", 2, "--epochs", "1"), timeout=240)[0][0] == 0
  (auto_state, auto_history), (flags_state, flags_history) = (
    checkpoint(tmp_path / "auto"),
    checkpoint(tmp_path / "flags"),
  )
  jax.tree.map(np.testing.assert_array_equal, auto_state, flags_state)
  assert [h["train_loss"] for h in auto_history] == [h["train_loss"] for h in flags_history]


@pytest.mark.slow
def test_distributed_auto_outside_a_cluster_job_is_one_error_line(five_step_data, tmp_path):
  env = {k: v for k, v in host_devices_env(1).items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
  result = subprocess.run(
    cli_command(*cli(five_step_data, tmp_path / "o", "--distributed", "auto")),
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-1500:]
  assert "error: --distributed auto found no SLURM, Open MPI or Cloud TPU job" in result.stderr
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("requested", [False, True], ids=["the user's devices", "devices --seeds asked for"])
def test_a_run_trains_data_parallel_on_the_users_devices_not_on_those_an_earlier_seeds_run_asked_for(
  monkeypatch, requested
):
  from experiments.lenet_fmnist.config import RunConfig
  from experiments.lenet_fmnist.distributed import setup_devices

  # (conftest.py gives this process 4 host devices; a notebook's earlier --seeds run may have asked for them)
  monkeypatch.setattr(train, "_REQUESTED", [4] if requested else [])
  mesh = setup_devices(RunConfig(seeds=[0], seed=0, batch_size=256))
  assert (mesh is None) == requested  # one device, as the chapter's run; else data parallel on all of them
  assert requested or mesh.size == jax.local_device_count()
