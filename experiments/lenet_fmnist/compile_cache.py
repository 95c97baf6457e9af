"""JAX's persistent compilation cache for a run: a second run of the same programs skips compiling them.

jax is imported inside, so that the data load (a thread) overlaps its import.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from experiments.lenet_fmnist.checkpoint import make_writable_dir
from experiments.lenet_fmnist.config import RunConfig

PROGRAMS = "programs"  # the folder of the cache where whole compiled programs are kept (programs.ProgramStore)


@contextlib.contextmanager
def compile_cache(config: RunConfig):
  """JAX's persistent compilation cache for the run (none at all with ``--no-compile-cache``, not even one
  the environment configures, e.g. ``JAX_COMPILATION_CACHE_DIR``), set back after it: ``main()`` called
  from Python (a notebook, the tests) leaves no global setting behind."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  names = (
    "jax_compilation_cache_dir",
    "jax_enable_compilation_cache",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  before = {name: getattr(jax.config, name) for name in names}
  try:
    compilation_cache.reset_cache()  # JAX opens its cache once per process: make it see this run's setting
    if config.no_compile_cache:
      jax.config.update("jax_enable_compilation_cache", False)
    else:
      enable_compile_cache(config.compile_cache)
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def enable_compile_cache(directory: str) -> None:
  """JAX's persistent compilation cache in ``directory``, with one line on stderr saying so (or why not)."""
  import jax

  path = Path(directory).expanduser()
  try:
    make_writable_dir(path)
    entries = sum(1 for p in path.iterdir() if not p.name.startswith(".") and p.name != PROGRAMS)
    entries += sum(1 for _ in (path / PROGRAMS).glob("*.xla")) if (path / PROGRAMS).is_dir() else 0
  except OSError as e:
    print(
      f"note: compilation cache {path} cannot be written ({e.strerror or e}); compiling from scratch "
      "(--compile-cache DIR to choose another, --no-compile-cache to silence this)",
      file=sys.stderr,
    )
    jax.config.update("jax_enable_compilation_cache", False)
    return
  jax.config.update("jax_compilation_cache_dir", str(path))
  # LeNet's programs compile in well under JAX's default 1 s threshold; cache them all.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  print(f"compilation cache: {path} ({entries} programs cached; --no-compile-cache to bypass)", file=sys.stderr)


def program_store(config: RunConfig, context: str):
  """The run's store of compiled programs (:class:`programs.ProgramStore`, the folder ``programs`` of the
  compilation cache) for a model named by ``context``; None with ``--no-compile-cache`` or where the compilation
  cache cannot be written."""
  import jax

  from experiments.lenet_fmnist.programs import ProgramStore

  if config.no_compile_cache or not jax.config.jax_enable_compilation_cache:
    return None
  return ProgramStore(Path(config.compile_cache).expanduser() / PROGRAMS, context)
