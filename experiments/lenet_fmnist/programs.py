"""Compiled programs kept on disk, so that a later run loads them instead of tracing, lowering and compiling.

JAX's persistent compilation cache (:mod:`compile_cache`) saves XLA's compilation, but a run still traces its
Python and lowers it to StableHLO to compute that cache's key: for LeNet's programs about 3 s of a
2-core CPU's time on every run. A :class:`ProgramStore` keys each program instead by what determines it without
tracing: the source of ``bnjax`` and of this experiment, the versions of jax, jaxlib, flax, optax and numpy,
the device and the CPU, JAX's configuration and ``XLA_FLAGS``, the model's settings (``context``), and the
program's name, static arguments and argument shapes. It keeps the executable jax serializes
(``jax.experimental.serialize_executable``). A file that fails to load is compiled again and replaced.

An executable that JAX itself loaded from its persistent cache serializes without its compiled kernels (jaxlib
0.10: the reloaded program fails with "Function ... not found"). So the store's programs are compiled apart from
that cache: under compiler options of their own (a default value set explicitly), which no plain ``jax.jit`` compilation
shares, and without writing them to it; and a program JAX still reports as a cache hit is used but not stored.

Only programs on one device, or on the host devices several seeds are split over, are stored (a data-parallel
mesh's programs compile on first use, with the persistent cache).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import sys
import threading
from pathlib import Path

import jax
import numpy as np
from jax._src import config as jax_config  # (the thread-local form of the persistent cache's write threshold)
from jax.experimental import serialize_executable

import bnjax

SOURCES = (Path(bnjax.__file__).parent, Path(__file__).parent)  # whose .py files the programs are traced from
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
SUFFIX = ".xla"
# A compiler option set to its default value: no effect on the program, but a persistent cache key of its own (JAX
# leaves only dump settings out of its keys), so that no executable JAX cached for a plain jax.jit call is taken.
APART = {"xla_embed_ir_in_executable": False}


class ProgramStore:
  """Compiled programs in ``directory``, for one model's settings (``context``: a string that names them)."""

  def __init__(self, directory: Path, context: str):
    self.directory = Path(directory)
    self.context = context
    self._trusted: bool | None = None  # (see trusted: checked once)

  def key(self, name: str, static: dict, args) -> str:
    """The file name of program ``name`` called with ``args`` (arrays or shapes) and ``static`` arguments."""
    parts = [environment(), self.context, name, repr(sorted(static.items())), repr(signature(args))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32] + SUFFIX

  def load(self, key: str, args, out_tree, devices=None) -> jax.stages.Compiled | None:
    """The program stored under ``key``, callable as ``program(*args)`` and returning ``out_tree``'s structure,
    compiled for ``devices`` (default: jit's default device; the key must name them); None when there is none,
    or when it cannot be loaded (the file is then removed: it is compiled again)."""
    path = self.directory / key
    if not path.is_file() or not self.trusted():
      return None
    try:
      payload = path.read_bytes()
    except OSError:
      return None
    try:
      return serialize_executable.deserialize_and_load(
        payload, in_tree(args), out_tree, execution_devices=devices or jax.devices()[:1]
      )
    except Exception as e:  # a truncated or foreign file: compile instead, and say so once
      print(f"note: compiled program {path} could not be loaded ({type(e).__name__}); compiling it", file=sys.stderr)
      path.unlink(missing_ok=True)
      return None

  def compile(self, key: str, lowered: jax.stages.Lowered, compiler_options: dict | None = None):
    """``lowered`` compiled apart from JAX's persistent cache (see the module's docstring), and stored."""
    hits = _cache_hits()
    with jax_config.persistent_cache_min_compile_time_secs(float("inf")):  # (this thread's compilations only)
      compiled = lowered.compile(compiler_options={**APART, **(compiler_options or {})})
    if _cache_hits() == hits:
      self.save(key, compiled)
    return compiled

  def trusted(self) -> bool:
    """Whether programs may be loaded from the folder: loading one unpickles it, which can run any code, so the
    folder and every file in it must be this user's and writable by nobody else (a shared cache is not used;
    a note says so once)."""
    if self._trusted is None:
      paths = [self.directory, *self.directory.glob("*" + SUFFIX)] if self.directory.is_dir() else []
      mine = all(_private(p) for p in paths)
      if paths and not mine:
        print(
          f"note: {self.directory} (or a file in it) is not this user's alone; its compiled programs are not "
          "loaded (loading one runs code from it), every program is compiled",
          file=sys.stderr,
        )
      self._trusted = mine
    return self._trusted

  def save(self, key: str, compiled: jax.stages.Compiled) -> None:
    """Stores ``compiled`` under ``key`` (written to a temporary name and renamed: never half a file), in a folder
    only this user can write. A program that cannot be serialized or written is simply not stored."""
    try:
      self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
      if not self.trusted():
        return
      payload, _, _ = serialize_executable.serialize(compiled)
      tmp = self.directory / f".{key}.{os.getpid()}.tmp"
      tmp.write_bytes(payload)
      tmp.replace(self.directory / key)
    except Exception:  # noqa: BLE001  (e.g. "`LessThan` is not serializable": XLA:CPU's sort of a short array)
      pass


_THREAD = threading.local()


def _count_cache_hits(event: str, **kwargs) -> None:
  if event == "/jax/compilation_cache/cache_hits":  # (reported in the thread that compiles)
    _THREAD.hits = _cache_hits() + 1


def _cache_hits() -> int:
  return getattr(_THREAD, "hits", 0)


jax.monitoring.register_event_listener(_count_cache_hits)


def _private(path: Path) -> bool:
  """Owned by this user and writable by nobody else."""
  info = path.stat()
  return info.st_uid == os.getuid() and not info.st_mode & 0o022


def in_tree(args):
  """The argument structure a compiled program checks its calls against: ``(args, {})``."""
  return jax.tree.structure((tuple(args), {}))


def signature(args) -> tuple:
  """``args``' structure (paths) and each leaf's shape, dtype and weak type: what a program's argument types are.
  Arrays and ``jax.ShapeDtypeStruct`` give the same signature; a Python scalar gives its weakly typed one."""
  leaves = jax.tree_util.tree_flatten_with_path(tuple(args))[0]
  return tuple((jax.tree_util.keystr(path), *_type_of(leaf)) for path, leaf in leaves)


def _type_of(x) -> tuple:
  if isinstance(x, (bool, int, float, complex)):
    x = jax.typeof(x)
  return tuple(np.shape(x)), str(x.dtype), bool(getattr(x, "weak_type", False))


def environment() -> str:
  """What, besides the model's settings and the arguments, determines a compiled program: the sources it is
  traced from, the packages' versions, the device (and the CPU it is compiled for), JAX's configuration (read
  at every call: a program may change it) and ``XLA_FLAGS``."""
  return "\n".join([_installation(), jax_settings()])


def jax_settings() -> str:
  """JAX's configuration as this thread sees it (a ``with jax.default_matmul_precision(...)`` included) and
  ``XLA_FLAGS``: what, besides the code and the arguments, a traced program depends on."""
  config = {k: v for k, v in jax.config.values.items() if not any(word in k for word in _NOT_IN_PROGRAMS)}
  return "\n".join([os.environ.get("XLA_FLAGS", ""), repr(sorted(config.items(), key=str))])


# Settings of JAX that say what to log or cache, not what to compute.
_NOT_IN_PROGRAMS = ("cache", "log_compiles", "logging", "explain", "debug_log", "traceback")


@functools.cache
def _installation() -> str:
  digest = hashlib.sha256()
  for folder in SOURCES:
    for path in sorted(folder.glob("*.py")):
      digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
  versions = {name: _version(name) for name in PACKAGES}
  device = jax.devices()[0]
  parts = [digest.hexdigest(), repr(versions), device.platform, device.device_kind, device.client.platform_version]
  return "\n".join([*parts, _cpu()])


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "-"


def _cpu() -> str:
  """The CPU's model and features (a program compiled for one CPU's instructions may not run on another)."""
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    import platform

    return platform.processor() or platform.machine()
  fields = ("model name", "flags", "Features", "CPU part")
  return repr(sorted({line for line in lines if line.split(":")[0].strip() in fields}))
