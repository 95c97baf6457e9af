"""The run's files: every write atomic, a refusal before any work to replace a run, the checkpoint format.

A checkpoint is one msgpack file holding the state (host arrays), the epoch, the history and the run's
settings, written to a temporary name and renamed: an interruption at any moment leaves the last
complete checkpoint and never a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from experiments.lenet_fmnist.config import RUN_IDENTITY, RunConfig

CHECKPOINT, METRICS, LOCK = "checkpoint.msgpack", "metrics.json", ".lock"
FORMAT = "bnjax-checkpoint-2"  # a SHA-256 over the payload; format 1 (no digest) is still read
# RUN_IDENTITY (config.py): what a resumed run must share with the checkpoint's run, in the checkpoint's words.


class RunError(Exception):
  """A problem the user can act on: printed as one ``error:`` line, no traceback."""


def run_config(args: RunConfig, **derived) -> dict:
  """The settings that make a run what it is, :data:`config.RUN_IDENTITY`'s names: those in ``derived`` (the variant's
  ``bn``, its ``precise_bn`` batches and ``ema`` decay, the data set's fingerprint ``data``, the examples per
  BN group ``bn_group_examples``), the others from ``args``."""
  seed = args.seeds if len(args.seeds) > 1 else args.seeds[0]
  return {k: derived[k] if k in derived else getattr(args, k) for k in RUN_IDENTITY} | {"seed": seed}


def data_fingerprint(*arrays) -> str:
  """``"<counts>:<sha256 prefix>"`` of the data set's arrays: another --data-dir (or a subset) differs."""
  digest = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    digest.update(f"{a.shape}{a.dtype}".encode())
    digest.update(memoryview(a).cast("B"))
  return f"{len(arrays[1])}+{len(arrays[3])} examples:{digest.hexdigest()[:16]}"


def atomic_write(path: Path, write) -> None:
  """``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never half."""
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    write(tmp)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    if e.filename is None:  # write() and fsync() errors (a full disk, a file-size limit) name no file
      raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    raise
  finally:
    tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
  atomic_write(path, lambda tmp: tmp.write_text(text))


def make_writable_dir(path: Path) -> None:
  """Creates ``path`` and proves a file can be written there; OSError otherwise."""
  path.mkdir(parents=True, exist_ok=True)
  probe = path / f".write-test.{os.getpid()}"
  probe.write_text("")
  probe.unlink()


def prepare_out_dir(out: str) -> Path:
  """Before any work: --out is (or can become) a writable directory; returns it as a Path."""
  if not out.strip():  # Path("") is the current directory: a typo must not spill runs into it
    raise RunError("--out is empty; name a directory for the run's files (default runs/lenet_fmnist).")
  out = Path(out)
  try:
    os.stat(out)
  except OSError as e:  # a loop makes exists() False and mkdir() say "File exists"
    if e.errno == errno.ELOOP:
      raise RunError(
        f"--out {out} is, or passes through, a symlink loop; remove the link or use another --out."
      ) from None
    if out.is_symlink():
      raise RunError(f"--out {out} is a symlink to {os.readlink(out)}, which does not exist.") from None
  if out.exists() and not out.is_dir():
    raise RunError(f"--out {out} is an existing file, not a directory.")
  try:
    make_writable_dir(out)
  except OSError as e:
    raise RunError(f"--out {out} is not writable ({e.strerror or e}).") from None
  return out


@contextlib.contextmanager
def exclusive(out: Path):
  """Holds an exclusive lock on ``out`` for the whole run, so a second run into it (even with --overwrite)
  is refused at once instead of both writing. The lock is ``fcntl.flock`` on ``out/.lock``: the kernel
  drops it when its process ends, however it ends, so a killed run never leaves a stale lock. Held, it
  also makes leftover temporary files (of killed writers) safe to remove.
  """
  fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      raise RunError(
        f"--out {out} is in use by another run (process {holder}); two runs would overwrite each other's "
        "checkpoints. Wait for it to finish, or use another --out."
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    # Only killed writers leave these (atomic_write's ".<name>.<pid>.tmp"), at the levels runs write to.
    for pattern in (".*.*.tmp", "*/.*.*.tmp", "*/seed-*/.*.*.tmp"):
      for tmp in out.glob(pattern):
        if tmp.is_file():
          tmp.unlink(missing_ok=True)
    yield
  finally:
    os.close(fd)


def check_runs(out: Path, norms: list[str], args: RunConfig) -> None:
  """Before any work: --out holds no run that would be silently replaced, and --resume has something to resume."""
  for norm in norms:
    run = out / norm
    held = run.is_dir() and any(run.iterdir())
    has_checkpoint = (run / CHECKPOINT).is_file()
    if args.resume and held and not has_checkpoint:
      raise RunError(
        f"--resume: {run} exists but holds no checkpoint ({CHECKPOINT}); nothing to resume. "
        "Use --overwrite to start it over, or a new --out."
      )
    if not args.resume and not args.overwrite and held:
      if not has_checkpoint:
        raise RunError(
          f"{run} holds files of a run that saved no checkpoint (it was stopped before its first epoch ended); "
          "pass --overwrite to start it over, or use a new --out."
        )
      raise RunError(
        f"{run} already holds a run; pass --resume to continue it, --overwrite to replace it, or a new --out."
      )


def check_same_epoch(out: Path, norms: list[str], epochs: int) -> None:
  """Before any work, for variants resumed to be compared side by side (--bn all): none has a checkpoint past
  ``epochs``, where it would stand at its own epoch beside the others at ``epochs`` (a single --bn refuses it too).

  Unreadable checkpoints are left to :func:`restore_checkpoint`, which names the damage.
  """
  past = {}
  for norm in norms:
    path = out / norm / CHECKPOINT
    try:
      epoch = int(read_checkpoint(path)["epoch"]) if path.is_file() else 0
    except RunError:
      raise
    except Exception:
      continue
    if epoch > epochs:
      past[path] = epoch
  if past:
    path, epoch = next(iter(past.items()))
    raise RunError(
      f"--resume: {path} is at epoch {epoch}, past --epochs {epochs}; the comparison would put it beside "
      f"variants at epoch {epochs}. Pass --epochs {max(past.values())} or more, or use a new --out."
    )


def _state_tree(state) -> dict:
  tree = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}
  return tree if state.ema_params is None else tree | {"ema_params": state.ema_params}


def save_checkpoint(path: Path, state, epoch: int, history: list[dict], config: dict) -> None:
  """State, epoch, history and settings in one msgpack file (a few hundred KB for LeNet), with a SHA-256 of
  them, written atomically."""
  from flax import serialization  # (here: the CLI's --help and flag errors need no jax)

  payload = {"state": _state_tree(state), "epoch": epoch, "history": json.dumps(history), "config": json.dumps(config)}
  inner = serialization.to_bytes(payload)
  data = serialization.msgpack_serialize(
    {"format": FORMAT, "sha256": hashlib.sha256(inner).hexdigest(), "payload": inner}
  )
  atomic_write(path, lambda tmp: tmp.write_bytes(data))


def read_checkpoint(path: Path, note_unchecked: bool = False) -> dict:
  """The checkpoint's payload (``state``, ``epoch``, ``history``, ``config``) after checking its digest
  (``note_unchecked``: say on stderr when the file is of the first format, which has none)."""
  from flax import serialization

  raw = serialization.msgpack_restore(path.read_bytes())
  if "payload" not in raw:  # format 1: the payload itself, no digest
    if note_unchecked:
      print(
        f"note: checkpoint {path} has bnjax's first format, which carries no SHA-256, so damage to it cannot "
        "be detected; checkpoints saved from now on are written in the checked format.",
        file=sys.stderr,
      )
    return raw
  if raw.get("format") != FORMAT:
    raise RunError(
      f"checkpoint {path} has format {raw.get('format')!r}; this bnjax reads {FORMAT!r} (and the unversioned "
      "first one). Use the bnjax that wrote it, --overwrite, or a new --out."
    )
  if hashlib.sha256(raw["payload"]).hexdigest() != raw.get("sha256"):
    raise RunError(
      f"checkpoint {path} is corrupted: its content does not match its SHA-256. Use --overwrite to start "
      "over, or a new --out."
    )
  return serialization.msgpack_restore(raw["payload"])


def _difference(key: str, saved, now) -> str:
  """One setting the checkpoint's run had otherwise, in the words of the flag that sets it."""
  if key == "bn_group_examples":
    return f"BN groups of {saved} examples (now {now}: --batch-size x --bn-group-size / the devices of all processes)"
  return f"--{key.replace('_', '-')} {saved} (now {now})"


def restore_checkpoint(path: Path, state, config: dict):
  """``(state, epoch, history)`` from ``path``; RunError for a corrupted file or another run's settings."""
  import jax
  from flax import serialization

  def unusable(e: Exception) -> RunError:  # msgpack, KeyError, ValueError from shapes, JSON: not a usable checkpoint
    return RunError(
      f"checkpoint {path} cannot be restored ({type(e).__name__}: {str(e)[:200]}); it is truncated, "
      "corrupted or not bnjax's. Use --overwrite to start over, or a new --out."
    )

  try:
    raw = read_checkpoint(path, note_unchecked=jax.process_index() == 0)
    saved = json.loads(raw["config"])
  except RunError:
    raise
  except Exception as e:
    raise unusable(e) from None
  # The settings first: another run's state may not even fit this one's (other seeds, no averaged weights).
  # Checkpoints written before a setting was recorded say nothing about it: it is not compared.
  differ = [_difference(k, saved[k], config[k]) for k in RUN_IDENTITY if k in saved and saved[k] != config[k]]
  if differ:
    raise RunError(
      f"--resume: the checkpoint {path} belongs to a run with {', '.join(differ)}; resuming would mix two "
      "runs in one history. Rerun with the checkpoint's settings, or use a new --out."
    )
  try:
    restored = serialization.from_state_dict(_state_tree(state), raw["state"])
    epoch, history = int(raw["epoch"]), json.loads(raw["history"])
  except Exception as e:
    raise unusable(e) from None
  return state.replace(**restored), epoch, history[:epoch]
