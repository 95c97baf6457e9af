"""The experiment end to end on a tiny synthetic data directory: outputs, resume, comparison, errors."""

import gc
import json
import re

import numpy as np
import pytest

from experiments import lenet_fmnist
from experiments.lenet_fmnist.arguments import VARIANTS
from experiments.lenet_fmnist.checkpoint import exclusive, read_checkpoint
from tests.experiments.helpers import cli, launch, make_fmnist_dir
from tests.helpers import ROOT
from tests.tolerance import assert_trees_close


def last_acc(metrics):
  return metrics["epochs"][-1]["test_acc"]


@pytest.mark.slow
def test_end_to_end_writes_metrics_plot_checkpoint_and_prints_the_chapter_lines(fmnist_dir, tmp_path, capsys):
  (summary,) = lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "2"))
  printed = capsys.readouterr().out
  run = tmp_path / "run" / "ours"
  metrics = json.loads((run / "metrics.json").read_text())
  assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
  assert {"train_loss", "train_acc", "test_acc", "examples_per_sec"} <= set(metrics["epochs"][0])
  for name in ("curves.png", "curves.svg"):
    assert (run / name).stat().st_size > 1000, name
  assert json.loads((run / "summary.json").read_text())["test_acc"] == last_acc(metrics)
  assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (run / "checkpoint.msgpack").is_file()
  assert not list(run.glob(".*.tmp")), "temporary files left behind"
  last = metrics["epochs"][-1]
  assert f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, test acc {last['test_acc']:.3f}" in printed
  assert re.search(r"examples/sec on \w+:\d+.*\n", printed)
  assert "gamma (bn1 scale):" in printed and "beta  (bn1 bias):" in printed
  assert len(summary["gamma"]) == 6
  assert gc.isenabled() and gc.get_freeze_count() == 0, "the run left Python's garbage collector changed"


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(fmnist_dir, tmp_path, capsys):
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "straight", "--epochs", "3"))
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "resumed", "--epochs", "1"))
  capsys.readouterr()
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "resumed", "--epochs", "3", "--resume"))
  assert re.findall(r"\[ours\] epoch +(\d+)/3", capsys.readouterr().out) == ["2", "3"]  # only the remaining ones
  straight = json.loads((tmp_path / "straight" / "ours" / "metrics.json").read_text())["epochs"]
  resumed = json.loads((tmp_path / "resumed" / "ours" / "metrics.json").read_text())["epochs"]
  keys = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")
  assert_trees_close([[r[k] for k in keys] for r in resumed], [[r[k] for k in keys] for r in straight])
  a = json.loads((tmp_path / "straight" / "ours" / "summary.json").read_text())
  b = json.loads((tmp_path / "resumed" / "ours" / "summary.json").read_text())
  assert_trees_close(np.array(b["gamma"]), np.array(a["gamma"]))


@pytest.mark.slow
def test_all_variants_a_comparison_table_and_a_resume_that_passes_over_finished_ones(fmnist_dir, tmp_path, capsys):
  summaries = lenet_fmnist.main(cli(fmnist_dir, tmp_path / "all", "--epochs", "1", "--bn", "all"))
  assert [s["bn"] for s in summaries] == ["ours", "flax", "none", "ours-precise", "ours-ema"]
  table = (tmp_path / "all" / "comparison.md").read_text()
  assert "| bnjax.BatchNorm |" in table and "| flax.linen.BatchNorm |" in table and "| no BatchNorm |" in table
  assert "| bnjax.BatchNorm + precise BN |" in table and "| bnjax.BatchNorm + precise BN + EMA weights |" in table
  assert "0.899 / 0.807" in table  # the chapter's numbers stand beside ours
  first = capsys.readouterr().out
  assert (tmp_path / "all" / "comparison.png").exists() and "| BatchNorm |" in first
  # --bn all interrupted in a later variant resumes there: the finished ones are passed over
  summaries = lenet_fmnist.main(cli(fmnist_dir, tmp_path / "all", "--epochs", "1", "--bn", "all", "--resume"))
  again = capsys.readouterr().out
  assert again.count("nothing to do") == 5 and [s["bn"] for s in summaries] == list(VARIANTS)
  assert first.split("| BatchNorm |")[1].split("\n")[2:7] == again.split("| BatchNorm |")[1].split("\n")[2:7]


@pytest.mark.slow
def test_missing_data_exits_with_one_clear_message(tmp_path):
  with pytest.raises(SystemExit, match=r"error: Fashion-MNIST directory .*nowhere does not exist.*apt-get install"):
    lenet_fmnist.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])


def test_distributed_auto_refuses_the_flags_it_replaces(capsys):
  for flags in (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], ["--process-id", "1"]):
    with pytest.raises(SystemExit) as exit_info:
      lenet_fmnist.parse_args(["--distributed", "auto", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error: --distributed auto takes the processes from the job's" in err


@pytest.mark.parametrize(
  "flag,value",
  [
    ("--epochs", "0"),
    ("--batch-size", "-1"),
    ("--batch-size", "1"),
    ("--lr", "0"),
    ("--lr", "nan"),
    ("--lr", "inf"),
    ("--seed", "-1"),
    ("--seed", str(2**32)),
    ("--compile-cache", "''"),  # JAX would read an empty directory as the current one
    ("--coordinator", "'127.0.0.1:99999'"),  # no such port: refused here, not after --timeout
    ("--coordinator", "'127.0.0.1'"),
  ],
)
def test_bad_flags_are_rejected_with_one_error_line(flag, value, capsys):
  with pytest.raises(SystemExit) as exit_info:
    lenet_fmnist.parse_args([flag, value.strip("'"), *(["--num-processes", "2"] if flag == "--coordinator" else [])])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and f"error: {flag} is {value}" in err and "Traceback" not in err


# --- nothing lost, nothing overwritten without asking (issue 8) ------------------------------------


@pytest.mark.slow
def test_an_existing_run_is_not_replaced_without_asking(fmnist_dir, tmp_path):
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1"))
  before = (tmp_path / "run" / "ours" / "checkpoint.msgpack").read_bytes()
  with pytest.raises(SystemExit, match=r"error: .*ours already holds a run; pass --resume .* --overwrite .* new --out"):
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1"))
  assert (tmp_path / "run" / "ours" / "checkpoint.msgpack").read_bytes() == before
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1", "--overwrite", "--seed", "1"))
  assert (tmp_path / "run" / "ours" / "checkpoint.msgpack").read_bytes() != before


@pytest.mark.slow
def test_resume_refuses_a_run_directory_without_a_checkpoint(fmnist_dir, tmp_path):
  (tmp_path / "run" / "ours").mkdir(parents=True)
  (tmp_path / "run" / "ours" / "metrics.json").write_text('{"epochs": []}')
  with pytest.raises(SystemExit, match=r"error: --resume: .*ours exists but holds no checkpoint .*--overwrite"):
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--resume"))


@pytest.mark.slow
@pytest.mark.parametrize(
  "flag,value",
  [
    ("--lr", "0.5"),
    ("--batch-size", "32"),
    ("--seed", "3"),
    ("--precision", "high"),
    ("--conv-impl", "im2col"),
    ("--bn-group-size", "2"),  # both runs on 4 devices
  ],
)
def test_resume_with_other_settings_is_refused(fmnist_dir, tmp_path, flag, value):
  devices = ["--devices", "4"] if flag == "--bn-group-size" else []
  lenet_fmnist.main([*cli(fmnist_dir, tmp_path / "run", "--epochs", "1"), *devices])
  # (one BN group of 4 devices normalizes over the whole batch of 64; groups of 2 over 32 examples each)
  said = r"BN groups of 64 examples \(now 32" if flag == "--bn-group-size" else rf"{flag} .*\(now {value}"
  with pytest.raises(SystemExit, match=rf"error: --resume: .*belongs to a run with {said}"):
    lenet_fmnist.main([*cli(fmnist_dir, tmp_path / "run", "--epochs", "2", "--resume"), *devices, flag, value])


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_named_on_resume(fmnist_dir, tmp_path):
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1"))
  ckpt = tmp_path / "run" / "ours" / "checkpoint.msgpack"
  ckpt.write_bytes(ckpt.read_bytes()[:1000])
  with pytest.raises(SystemExit, match=r"error: checkpoint .*checkpoint.msgpack cannot be restored .*truncated") as e:
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "2", "--resume"))
  assert len(str(e.value)) < 600, "one line, not a dump"


@pytest.mark.slow
def test_a_truncated_metrics_file_is_rebuilt_from_the_checkpoint(fmnist_dir, tmp_path, capsys):
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "2"))
  metrics = tmp_path / "run" / "ours" / "metrics.json"
  metrics.write_text(metrics.read_text()[:50])
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "3", "--resume"))
  assert re.search(
    r"note: .*metrics.json is unreadable \(JSONDecodeError.*rewritten from the checkpoint", capsys.readouterr().err
  )
  assert [e["epoch"] for e in json.loads(metrics.read_text())["epochs"]] == [1, 2, 3]


@pytest.mark.slow
def test_out_must_be_a_writable_directory_checked_before_the_data(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  nowhere = ["--data-dir", str(tmp_path / "no-data"), "--no-compile-cache"]
  with pytest.raises(SystemExit, match=r"error: --out .*file is an existing file, not a directory"):
    lenet_fmnist.main(["--out", str(a_file), *nowhere])
  with pytest.raises(SystemExit, match=r"error: --out .*file/sub is not writable"):
    lenet_fmnist.main(["--out", str(a_file / "sub"), *nowhere])


@pytest.mark.slow
def test_a_last_batch_of_one_example_is_dropped_not_fatal(tmp_path):
  d = make_fmnist_dir(tmp_path / "d", n_train=129, n_test=16)
  (summary,) = lenet_fmnist.main(cli(d, tmp_path / "run", "--epochs", "1"))
  metrics = json.loads((tmp_path / "run" / "ours" / "metrics.json").read_text())
  assert np.isfinite(summary["train_loss"]) and metrics["epochs"][0]["examples_per_sec"] > 0


# --- whole processes: kills, Ctrl-C, the compilation cache -----------------------------------------


def wait_for_epoch_line(proc, n_lines=1, timeout=120):
  """Reads the child's stdout up to its n-th epoch line; a child silent for ``timeout`` s is killed (so a
  failure ends the test, with the child's stderr, instead of hanging it)."""
  import threading

  timer = threading.Timer(timeout, proc.kill)
  timer.start()
  try:
    seen = 0
    while seen < n_lines:
      line = proc.stdout.readline()
      if not line:  # the child ended, or was killed by the timer
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"no epoch line from the child within {timeout} s: {err[-2000:]}")
      seen += "] epoch" in line
  finally:
    timer.cancel()


@pytest.mark.slow
def test_sigkill_at_any_moment_keeps_a_restorable_checkpoint(fmnist_dir, tmp_path):
  """The kill test: SIGKILL while epochs (and their saves) are under way, several times; resume always works."""
  import random
  import time

  out, cache = tmp_path / "run", tmp_path / "cache"
  random.seed(0)
  for attempt in range(3):
    # So many epochs that no attempt can end before its kill, however fast the machine.
    proc = launch(fmnist_dir, out, "--epochs", "1000000", *(["--resume"] if attempt else []), cache=cache)
    try:
      wait_for_epoch_line(proc, 2)  # epoch 1's files are complete; epoch 2's are being written
      time.sleep(random.uniform(0.0, 0.5))  # lands anywhere in an epoch, including inside a save
    finally:
      proc.kill()
      proc.communicate()
    assert (out / "ours" / "checkpoint.msgpack").is_file()
    assert json.loads((out / "ours" / "metrics.json").read_text())["epochs"]
  saved = read_checkpoint(out / "ours" / "checkpoint.msgpack")["epoch"]
  (summary,) = lenet_fmnist.main(cli(fmnist_dir, out, "--epochs", str(saved + 2), "--resume"))
  history = json.loads((out / "ours" / "metrics.json").read_text())["epochs"]
  assert [e["epoch"] for e in history] == list(range(1, saved + 3)) and np.isfinite(summary["train_loss"])


@pytest.mark.slow
@pytest.mark.parametrize(
  "signame,code,said",
  [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated (SIGTERM)")],
  ids=["ctrl-c", "kill"],
)
def test_ctrl_c_or_sigterm_exits_with_one_line_saying_how_to_resume(fmnist_dir, tmp_path, signame, code, said):
  import signal

  # So many epochs that the run cannot end before the signal, however fast the machine.
  proc = launch(fmnist_dir, tmp_path / "run", "--epochs", "1000000", cache=tmp_path / "cache", ctrl_c=True)
  wait_for_epoch_line(proc, 2)  # so that epoch 1 is saved
  proc.send_signal(getattr(signal, signame))
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == code, err
  assert "Traceback" not in err and "compilation cache:" in err
  (line,) = [line for line in err.splitlines() if line.startswith("error:")]
  assert re.match(
    rf"error: {re.escape(said)} during \[ours\]\. Saved: \[ours\] epoch \d+ in .*checkpoint\.msgpack", line
  )
  assert "--resume" in line
  assert (
    not list((tmp_path / "run" / "ours").glob(".*.tmp")) and not (tmp_path / "run" / "ours" / "curves.svg").exists()
  )


@pytest.mark.slow
def test_an_unwritable_compilation_cache_is_said_once_and_training_goes_on(fmnist_dir, tmp_path):
  blocker = tmp_path / "cache-is-a-file"
  blocker.write_text("")
  proc = launch(fmnist_dir, tmp_path / "run", "--epochs", "1", cache=blocker / "sub")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert err.count("note: compilation cache") == 1 and "cannot be written" in err


@pytest.mark.slow
def test_no_compile_cache_writes_no_cache_not_even_jaxs_own(fmnist_dir, tmp_path):
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  before = jax.config.jax_compilation_cache_dir  # the suite's own cache (conftest.py)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax-cache"))
  compilation_cache.reset_cache()  # JAX opens its cache once per process: make it see this directory
  try:
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1", "--no-compile-cache"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax-cache")  # set back afterwards
    assert jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()
  assert not (tmp_path / "jax-cache").exists() or not any((tmp_path / "jax-cache").iterdir())


@pytest.mark.slow
def test_api_nnx_gives_the_linen_runs_numbers_and_files(fmnist_dir, tmp_path, norm="ours"):
  # (Flax's BN in the NNX LeNet: same logits as linen's, tests/test_models.py)
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "linen", "--epochs", "2", "--bn", norm))
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "nnx", "--epochs", "1", "--bn", norm, "--api", "nnx"))
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "nnx", "--epochs", "2", "--bn", norm, "--api", "nnx", "--resume"))
  keys = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")
  linen, nnx_run = (json.loads((tmp_path / d / norm / "metrics.json").read_text()) for d in ("linen", "nnx"))
  assert nnx_run["args"]["api"] == "nnx"
  assert_trees_close([[r[k] for k in keys] for r in nnx_run["epochs"]], [[r[k] for k in keys] for r in linen["epochs"]])
  for name in ("checkpoint.msgpack", "curves.png", "curves.svg", "summary.json"):
    assert (tmp_path / "nnx" / norm / name).is_file(), name
  # one checkpoint format: the NNX run's checkpoint resumes under linen
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "nnx", "--epochs", "3", "--bn", norm, "--resume"))


@pytest.mark.slow
def test_precise_bn_recomputes_the_statistics_before_every_evaluation(fmnist_dir, tmp_path):
  import jax

  from bnjax import precise_batch_stats
  from experiments.lenet_fmnist import input_pipeline as data
  from experiments.lenet_fmnist import train
  from experiments.lenet_fmnist.models import LeNet

  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "p", "--epochs", "2", "--precise-bn", "3"))
  plain = json.loads((tmp_path / "p" / "ours" / "metrics.json").read_text())["epochs"]
  assert all(e["precise_bn_seconds"] > 0 for e in plain)
  # The checkpointed statistics are the population statistics of 3 x 64 training examples, not an EMA.
  raw = read_checkpoint(tmp_path / "p" / "ours" / "checkpoint.msgpack")
  ds = data.load_idx_dir(fmnist_dir, expect_full=False, pixels="uint8")
  shuffle_key = jax.random.split(jax.random.key(0))[1]
  perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(shuffle_key, 1), 1), 512)
  batches = np.asarray(ds.train_images)[np.asarray(perm[:192])].reshape(3, 64, 28, 28, 1)
  variables = {"params": raw["state"]["params"], "batch_stats": raw["state"]["batch_stats"]}
  model = LeNet()
  want = precise_batch_stats(
    lambda v, x, **kw: model.apply(v, train.as_float_images(x), **kw), variables, batches, model_kwargs={"train": True}
  )
  assert_trees_close(raw["state"]["batch_stats"], want["batch_stats"])


# --- one run identity, one writer, checked checkpoints (issue 17) ------------------------------------


@pytest.mark.slow
def test_a_checkpoint_with_flipped_bytes_is_refused_naming_the_file(fmnist_dir, tmp_path):
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1"))
  ckpt = tmp_path / "run" / "ours" / "checkpoint.msgpack"
  data = bytearray(ckpt.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 20):  # inside the weights: still a valid msgpack file
    data[i] ^= 0x5A
  ckpt.write_bytes(bytes(data))
  with pytest.raises(SystemExit, match=r"error: checkpoint .*checkpoint.msgpack is corrupted: its content does not"):
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "2", "--resume"))


@pytest.mark.slow
def test_a_second_run_into_the_same_out_is_refused_even_with_overwrite(fmnist_dir, tmp_path):
  out = tmp_path / "run"
  out.mkdir()
  with exclusive(out):  # as a run in progress holds it
    with pytest.raises(SystemExit, match=r"error: --out .*run is in use by another run \(process \d+\)"):
      lenet_fmnist.main(cli(fmnist_dir, out, "--epochs", "1", "--overwrite"))
  lenet_fmnist.main(cli(fmnist_dir, out, "--epochs", "1"))  # released: the next run goes ahead


@pytest.mark.slow
def test_a_run_holds_its_out_for_its_whole_life_and_a_killed_one_leaves_no_stale_lock(fmnist_dir, tmp_path):
  # Cannot finish during the test. Its own compilation cache: a kill mid-write must not leave a torn
  # entry in the suite's shared one.
  proc = launch(fmnist_dir, tmp_path / "run", "--epochs", "1000000", cache=tmp_path / "cache")
  try:
    wait_for_epoch_line(proc, 2)  # well into its training, checkpoints saved
    with pytest.raises(SystemExit, match=rf"is in use by another run \(process {proc.pid}\)"):
      lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1", "--overwrite"))
  finally:
    proc.kill()  # SIGKILL
    proc.communicate()
  assert (tmp_path / "run" / ".lock").exists()  # left behind by the killed run, but not held
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1", "--overwrite"))


@pytest.mark.slow
@pytest.mark.parametrize(
  "change,pattern",
  [
    ("data", r"--data (\d+\+\d+) examples:(\w+) \(now \1 examples:(?!\2)\w+\)"),  # same counts, other images
    ("precise", r"--precise-bn 0 \(now 2\)"),
  ],
)
def test_resume_with_other_data_or_precise_bn_is_refused(fmnist_dir, tmp_path, change, pattern):
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1"))
  other = make_fmnist_dir(tmp_path / "other", seed=1)  # fmnist_dir's counts: only the content differs
  extra = ["--precise-bn", "2"] if change == "precise" else []
  data = other if change == "data" else fmnist_dir
  with pytest.raises(SystemExit, match=rf"error: --resume: .*belongs to a run with {pattern}"):
    lenet_fmnist.main([*cli(data, tmp_path / "run", "--epochs", "2", "--resume"), *extra])


@pytest.mark.slow
def test_leftovers_of_killed_writers_are_cleaned_and_an_unsaved_run_says_to_overwrite(fmnist_dir, tmp_path):
  run = tmp_path / "out" / "ours"
  run.mkdir(parents=True)
  (run / ".checkpoint.msgpack.999999.tmp").write_bytes(b"half a checkpoint")
  (run / "seed-3").mkdir()  # --seeds runs keep per-seed files one level deeper
  (run / "seed-3" / ".metrics.json.999999.tmp").write_text("{")
  (run / "metrics.json").write_text("{}")  # killed during its first checkpoint write
  with pytest.raises(SystemExit, match=r"holds files of a run that saved no checkpoint .*pass --overwrite"):
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / "out", "--epochs", "1"))
  assert not list(run.rglob(".*.tmp"))
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "out", "--epochs", "1", "--overwrite"))


@pytest.mark.slow
@pytest.mark.parametrize(
  "n_train,n_test,extra,pattern",
  [
    (0, 16, [], r"has 0 training and 16 test examples"),
    (100, 0, [], r"has 100 training and 0 test examples"),
    # --bn all: ours, flax and none come before ours-precise, and none of them may train first
    (100, 16, ["--bn", "all", "--batch-size", "128"], r"precise BN needs at least one full batch of 128"),
  ],
)
def test_too_little_data_is_one_error_line_before_training(tmp_path, capsys, n_train, n_test, extra, pattern):
  d = make_fmnist_dir(tmp_path / "d", n_train=n_train, n_test=n_test)
  with pytest.raises(SystemExit, match=pattern):
    lenet_fmnist.main([*cli(d, tmp_path / "run", "--epochs", "1"), *extra])
  assert "] epoch" not in capsys.readouterr().out  # refused before an epoch trained (and was lost)
  assert not list((tmp_path / "run").glob("*/checkpoint.msgpack"))


@pytest.mark.slow
def test_a_symlink_loop_as_out_is_named_as_one(tmp_path):
  (tmp_path / "loop").symlink_to(tmp_path / "loop")
  with pytest.raises(SystemExit, match=r"error: --out .*loop is, or passes through, a symlink loop"):
    lenet_fmnist.main(["--out", str(tmp_path / "loop"), "--no-compile-cache"])


@pytest.mark.slow
def test_a_file_size_limit_is_one_error_line_naming_the_file(fmnist_dir, tmp_path):
  import subprocess
  import sys

  # The child limits itself (no preexec_fn: forking this multithreaded process may deadlock); the checkpoint,
  # a few hundred KB, is the first file over 100 KB.
  code = (
    "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
    "sys.argv[0] = 'lenet_fmnist'; runpy.run_module('experiments.lenet_fmnist', run_name='__main__')"
  )
  args = cli(fmnist_dir, tmp_path / "run", "--epochs", "1", "--no-compile-cache")
  result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert re.fullmatch(r"error: cannot write the run's files \(.*/run/ours/checkpoint\.msgpack\): File too large", last)


@pytest.mark.slow
def test_an_empty_out_is_refused():
  with pytest.raises(SystemExit, match=r"error: --out is empty"):
    lenet_fmnist.main(["--out", ""])


@pytest.mark.slow
def test_an_unknown_checkpoint_format_is_refused(fmnist_dir, tmp_path):
  from flax import serialization

  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1"))
  ckpt = tmp_path / "run" / "ours" / "checkpoint.msgpack"
  raw = serialization.msgpack_restore(ckpt.read_bytes())
  ckpt.write_bytes(serialization.msgpack_serialize({**raw, "format": "bnjax-checkpoint-99"}))
  with pytest.raises(SystemExit, match=r"has format 'bnjax-checkpoint-99'; this bnjax reads"):
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "2", "--resume"))


@pytest.mark.slow
def test_a_checkpoint_of_the_first_unchecked_format_resumes_with_a_note_and_is_saved_checked(
  fmnist_dir, tmp_path, capsys
):
  from flax import serialization

  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1"))
  ckpt = tmp_path / "run" / "ours" / "checkpoint.msgpack"
  ckpt.write_bytes(serialization.msgpack_serialize(read_checkpoint(ckpt)))  # the payload itself, no digest
  capsys.readouterr()
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "2", "--resume"))
  assert "has bnjax's first format, which carries no SHA-256" in capsys.readouterr().err
  assert "sha256" in serialization.msgpack_restore(ckpt.read_bytes())  # rewritten in the checked format


def test_the_cli_choices_are_the_modules_own():
  # arguments.py repeats them so that --help and a bad flag answer without importing jax.
  import subprocess
  import sys

  from experiments.lenet_fmnist import arguments, conv, models, train

  assert arguments.NORMS == models.NORMS and arguments.PRECISIONS == models.PRECISIONS
  parser_choices = {a.dest: a.choices for a in arguments.build_parser()._actions if a.choices}
  assert tuple(parser_choices["loop"]) == train.LOOPS and tuple(parser_choices["conv_impl"]) == conv.IMPLS
  code = "import sys, experiments.lenet_fmnist as m; m.parse_args(['--bn', 'ours']); print('jax' in sys.modules)"
  assert (
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
  )


def test_help_shows_every_flags_default_and_three_examples():
  # Read from the parser's own actions, so a flag added without its default in --help fails here.
  from experiments.lenet_fmnist import arguments

  parser = arguments.build_parser()
  shown = " ".join(parser.format_help().split())
  unwrapped = "".join(shown.split())  # argparse rewraps lines, also at hyphens
  formatter = parser._get_formatter()
  flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
  assert len(flags) >= 25
  for action in flags:
    text = " ".join(formatter._expand_help(action).split())
    assert "".join(text.split()) in unwrapped, action.dest
    assert "(default: " in text or "; default: " in text, f"--help shows no default for {action.option_strings[0]}"
    if action.default not in (None, False):
      assert str(action.default) in text, f"--help does not show {action.option_strings[0]}'s {action.default!r}"
    assert "see " not in text, f"{action.option_strings[0]}'s help points elsewhere: {text}"
  for choice in (*VARIANTS, "lanes", "im2col", "xla", "scan", "step", "idx", "tfds", "nnx"):
    assert choice in shown  # each choice is described, not only listed
  for group in ("training", "variants", "data", "output", "devices"):
    assert any(g.title.startswith(group) and g._group_actions for g in parser._action_groups), group
  examples = [
    line for line in parser.epilog.splitlines() if line.strip().startswith("python -m experiments.lenet_fmnist")
  ]
  assert len(examples) == 3
  for line in examples:
    arguments.parse_args(line.split("#")[0].split()[3:])  # each example parses


# --- several seeds in one program, weight averaging (issue 19) ---------------------------------------


@pytest.mark.slow
def test_seeds_side_by_side_give_each_seeds_own_run_files_and_a_summary(fmnist_dir, tmp_path, capsys):
  # ours-ema covers the moving average and precise BN of the averaged weights too; the multi-seed run is
  # interrupted after epoch 1 and resumed, against single-seed runs straight through.
  extra = ("--bn", "ours-ema", "--precise-bn", "2", "--ema", "0.9")
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "many", "--epochs", "1", "--seeds", "0,3", *extra))
  summary = lenet_fmnist.main(cli(fmnist_dir, tmp_path / "many", "--epochs", "2", "--seeds", "0,3", "--resume", *extra))
  printed = capsys.readouterr().out
  assert re.search(r"\[ours-ema\] epoch  2/2  loss \d\.\d{3} ± \d\.\d{3} .*\(min \d\.\d{3}\)  \[2 seeds\]", printed)
  assert re.search(r"test acc per seed: 0: \d\.\d{3}, 3: \d\.\d{3}", printed)
  run = tmp_path / "many" / "ours-ema"
  keys = ("train_loss", "train_acc", "test_loss", "test_acc")
  for i, seed in enumerate((0, 3)):
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / f"one-{seed}", "--epochs", "2", "--seed", str(seed), *extra))
    single = json.loads((tmp_path / f"one-{seed}" / "ours-ema" / "metrics.json").read_text())["epochs"]
    mine = json.loads((run / f"seed-{seed}" / "metrics.json").read_text())
    assert mine["seed"] == seed and [e["epoch"] for e in mine["epochs"]] == [1, 2]
    assert_trees_close([mine["epochs"][0][k] for k in keys], [single[0][k] for k in keys])
    assert_trees_close([mine["epochs"][1][k] for k in keys], [single[1][k] for k in keys], "trajectory")
    assert summary[0]["per_seed"]["test_acc"][i] == mine["epochs"][1]["test_acc"]
    want = read_checkpoint(tmp_path / f"one-{seed}" / "ours-ema" / "checkpoint.msgpack")["state"]
    got = read_checkpoint(run / "checkpoint.msgpack")["state"]
    for part in ("params", "ema_params"):
      assert_trees_close(_row(got[part], i), want[part], "trajectory")
  spread = json.loads((run / "summary.json").read_text())["distribution"][-1]["test_acc"]
  accs = summary[0]["per_seed"]["test_acc"]
  assert spread["mean"] == pytest.approx(np.mean(accs)) and spread["min"] == min(accs)
  assert spread["std"] == pytest.approx(np.std(accs))
  assert (run / "curves.png").stat().st_size > 1000
  per_seed = (tmp_path / "many" / "seeds.md").read_text()
  assert "| | seed 0 | seed 3 | mean ± std | min |" in per_seed
  assert f"| {accs[0]:.3f} | {accs[1]:.3f} | {np.mean(accs):.3f} ± {np.std(accs):.3f} |" in per_seed


def _row(tree, i):
  import jax

  return jax.tree.map(lambda a: np.asarray(a)[i], tree)


@pytest.mark.parametrize(
  "argv,pattern",
  [
    (["--seeds", "3-1"], r"--seeds 3-1: the range 3-1 is empty"),
    (["--seeds", "0,x"], r"--seeds 0,x: 'x' is not a seed or a range like 0-7"),
    (["--seeds", "0-3,2"], r"--seeds 0-3,2: a seed is given twice"),
    (["--seeds", "0-99"], r"--seeds 0-99: 0-99 holds more than 64 seeds"),
    (["--seeds", "0-1", "--seed", "2"], r"--seed and --seeds both given"),
    (["--seeds", "0-1", "--devices", "2"], r"--seeds trains its replicas in one program .* with data-parallel"),
    (["--ema", "1"], r"--ema is 1.0, but should lie in \(0, 1\)"),
    (["--ema", "0"], r"--ema is 0.0, but should lie in \(0, 1\)"),
  ],
)
def test_bad_seeds_or_ema_are_one_error_line(argv, pattern, capsys):
  with pytest.raises(SystemExit) as exit_info:
    lenet_fmnist.parse_args(argv)
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and re.search(pattern, err) and "Traceback" not in err, err


def test_seeds_are_parsed_as_ranges_and_lists():
  from experiments.lenet_fmnist.arguments import parse_seeds

  assert parse_seeds("0-7") == list(range(8)) and parse_seeds("0,3,5") == [0, 3, 5] and parse_seeds("5") == [5]
  assert parse_seeds("0-2, 8") == [0, 1, 2, 8]
  args = lenet_fmnist.parse_args([])
  assert args.seeds == [0] and args.seed == 0


@pytest.mark.slow
def test_resume_with_other_seeds_or_ema_is_refused(fmnist_dir, tmp_path):
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1", "--seeds", "0-1"))
  with pytest.raises(SystemExit, match=r"error: --resume: .*belongs to a run with --seed \[0, 1\] \(now \[0, 2\]\)"):
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "2", "--seeds", "0,2", "--resume"))
  # (averaged weights get precise BN statistics of their own: --ema brings 100 precise-BN batches)
  ema_differs = r"belongs to a run with --precise-bn 0 \(now 100\), --ema 0.0 \(now 0.5\)"
  with pytest.raises(SystemExit, match=r"error: --resume: .*" + ema_differs):
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "2", "--seeds", "0-1", "--ema", "0.5", "--resume"))


# --- a run's identity, one epoch per comparison, honest labels (issue 26) -----------------------------


@pytest.mark.slow
def test_resume_keeps_the_number_of_examples_each_bn_group_normalizes_over(fmnist_dir, tmp_path):
  run = tmp_path / "run"
  # 2 devices in BN groups of 1: each BN layer normalizes over 32 of a batch's 64 examples.
  lenet_fmnist.main([*cli(fmnist_dir, run, "--epochs", "1"), "--devices", "2", "--bn-group-size", "1"])
  # 1 device: over all 64, another computation.
  with pytest.raises(SystemExit, match=r"error: --resume: .*belongs to a run with BN groups of 32 examples \(now 64"):
    lenet_fmnist.main([*cli(fmnist_dir, run, "--epochs", "2", "--resume"), "--devices", "1", "--bn-group-size", "1"])
  # 4 devices in groups of 2: 32 examples again, the same computation laid out on other devices.
  lenet_fmnist.main([*cli(fmnist_dir, run, "--epochs", "2", "--resume"), "--devices", "4", "--bn-group-size", "2"])
  assert [e["epoch"] for e in json.loads((run / "ours" / "metrics.json").read_text())["epochs"]] == [1, 2]


@pytest.mark.slow
def test_all_variants_resumed_past_epochs_are_refused_not_compared_across_epochs(fmnist_dir, tmp_path, capsys):
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "2"))
  capsys.readouterr()
  with pytest.raises(
    SystemExit, match=r"error: --resume: .*ours.checkpoint\.msgpack is at epoch 2, past --epochs 1; .*--epochs 2"
  ):
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1", "--bn", "all", "--resume"))
  assert "] epoch" not in capsys.readouterr().out  # refused before any variant trained
  assert not (tmp_path / "run" / "comparison.md").exists() and not (tmp_path / "run" / "flax").exists()


@pytest.mark.slow
def test_all_variants_are_labelled_with_what_each_ran(fmnist_dir, tmp_path):
  # --precise-bn applies to every variant with BN: ours and ours-precise then run the same thing.
  summaries = lenet_fmnist.main(cli(fmnist_dir, tmp_path / "all", "--epochs", "1", "--bn", "all", "--precise-bn", "2"))
  rows = [line.split(" | ")[0][2:] for line in (tmp_path / "all" / "comparison.md").read_text().splitlines()[2:]]
  assert rows == [
    "bnjax.BatchNorm + precise BN",
    "flax.linen.BatchNorm + precise BN",
    "no BatchNorm",
    "bnjax.BatchNorm + precise BN",
    "bnjax.BatchNorm + precise BN + EMA weights",
  ]
  assert [s["label"] for s in summaries] == rows
  ours, precise = summaries[0], summaries[3]
  assert (ours["train_loss"], ours["test_acc"]) == (precise["train_loss"], precise["test_acc"])
  (none,) = lenet_fmnist.main(cli(fmnist_dir, tmp_path / "none", "--epochs", "1", "--bn", "none", "--ema", "0.9"))
  assert none["label"] == "no BatchNorm + EMA weights"


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", ["1000", "100000000"], ids=["just-over", "huge"])
def test_a_batch_larger_than_the_training_set_is_refused_before_anything_is_deleted(fmnist_dir, tmp_path, batch_size):
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1"))
  ckpt = tmp_path / "run" / "ours" / "checkpoint.msgpack"
  before = ckpt.read_bytes()
  with pytest.raises(SystemExit, match=rf"error: --batch-size is {batch_size}, but the training set has 512 examples"):
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "1", "--overwrite", "--batch-size", batch_size))
  assert ckpt.read_bytes() == before and (tmp_path / "run" / "ours" / "metrics.json").is_file()


# --- resume is observed resuming; the chapter's settings are pinned -------------------------------------


@pytest.mark.slow
def test_resume_continues_from_the_checkpoints_weights(fmnist_dir, tmp_path):
  import hashlib
  import shutil

  import jax
  from flax import serialization

  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "kept", "--epochs", "1"))
  shutil.copytree(tmp_path / "kept", tmp_path / "altered")
  ckpt = tmp_path / "altered" / "ours" / "checkpoint.msgpack"
  raw = serialization.msgpack_restore(ckpt.read_bytes())
  payload = serialization.msgpack_restore(raw["payload"])
  payload["state"]["params"] = jax.tree.map(lambda a: a * 0.5, payload["state"]["params"])
  raw["payload"] = serialization.msgpack_serialize(payload)
  raw["sha256"] = hashlib.sha256(raw["payload"]).hexdigest()  # a valid checkpoint of other weights
  ckpt.write_bytes(serialization.msgpack_serialize(raw))
  for name in ("kept", "altered"):
    lenet_fmnist.main(cli(fmnist_dir, tmp_path / name, "--epochs", "2", "--resume"))
  kept, altered = (
    json.loads((tmp_path / n / "ours" / "metrics.json").read_text())["epochs"] for n in ("kept", "altered")
  )
  assert kept[0] == altered[0]  # epoch 1 comes from the checkpoints' history, not retrained
  assert kept[1]["train_loss"] != altered[1]["train_loss"]  # epoch 2 trained from each checkpoint's weights


@pytest.mark.slow
def test_the_cli_defaults_are_the_chapters_settings():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  import bnjax
  from experiments.lenet_fmnist.models import LeNet

  args = lenet_fmnist.parse_args([])
  assert (args.lr, args.batch_size, args.epochs, args.bn, args.seed) == (1.0, 256, 10, "ours", 0)
  assert (args.precise_bn, args.ema, args.precision) == (0, None, "highest")
  for norm, kind in (("ours", bnjax.BatchNorm), ("flax", nn.BatchNorm)):
    layers = {}

    def record(next_fun, fun_args, kwargs, context, layers=layers, kind=kind):
      if isinstance(context.module, kind):
        layers[context.module.name] = (context.module.momentum, context.module.epsilon)
      return next_fun(*fun_args, **kwargs)

    with nn.intercept_methods(record):
      LeNet(norm).init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=True)
    assert layers == {f"bn{i}": (0.9, 1e-5) for i in range(1, 5)}, norm


@pytest.mark.parametrize("enabled", [True, False])
def test_the_run_spares_its_imports_from_the_garbage_collector_and_sets_it_back(enabled):
  from experiments.lenet_fmnist.train_and_evaluate import ImportsSpared

  (gc.enable if enabled else gc.disable)()
  try:
    with ImportsSpared() as imports:
      assert not gc.isenabled()  # while the libraries are imported
      imports.imported()
      assert gc.isenabled() == enabled and gc.get_freeze_count() > 0
    assert gc.isenabled() == enabled and gc.get_freeze_count() == 0
    with pytest.raises(KeyError), ImportsSpared():  # a run that fails while it imports
      raise KeyError
    assert gc.isenabled() == enabled and gc.get_freeze_count() == 0
  finally:
    gc.enable()


def test_the_run_leaves_a_callers_own_frozen_objects_frozen():
  from experiments.lenet_fmnist.train_and_evaluate import ImportsSpared

  gc.freeze()
  try:
    frozen = gc.get_freeze_count()
    with ImportsSpared() as imports:
      imports.imported()
      mine = [object()]  # noqa: F841  (made after the caller's freeze: not frozen by the run)
      assert gc.get_freeze_count() == frozen
    assert gc.isenabled() and gc.get_freeze_count() == frozen
  finally:
    gc.unfreeze()
