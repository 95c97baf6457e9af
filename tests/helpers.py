"""Helpers shared by the library's tests (nothing here imports the experiment).

The experiment's tests have theirs in tests/experiments/helpers.py; the one tolerance helper is
tests/tolerance.py; fixtures and session setup are in tests/conftest.py.
"""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bnjax

ROOT = Path(__file__).resolve().parents[1]  # the repository root

CPU_DEVICES = jax.devices("cpu")  # 4 host devices, whatever the default backend (conftest.py sets XLA_FLAGS)


# --- a tiny model of the tests' own -------------------------------------------------------------------

CNN_IMAGE = (10, 10, 1)  # TinyCNN's input: (N, 10, 10, 1) images


def channel_axis(layout: str) -> int:
  """The feature axis of 4-D activations in ``layout``: last for NHWC, first for CHWN."""
  return 0 if layout == "CHWN" else -1


class LayoutConv(nn.Module):
  """A 3x3 VALID convolution that takes and returns activations in ``layout`` (NHWC or CHWN)."""

  features: int
  layout: str = "NHWC"

  @nn.compact
  def __call__(self, x):
    swap = (3, 1, 2, 0)  # CHWN <-> NHWC (its own inverse)
    x = jnp.transpose(x, swap) if self.layout == "CHWN" else x
    y = nn.Conv(self.features, (3, 3), padding="VALID")(x)
    return jnp.transpose(y, swap) if self.layout == "CHWN" else y


class TinyCNN(nn.Module):
  """A small CNN with BN after every conv/dense but the last, LeNet's shape at a tenth of its size.

      conv 4@3x3 - BN - sigmoid - avgpool 2 - conv 6@3x3 - BN - sigmoid - flatten -
      dense 8 - BN - sigmoid - dense 5 - BN - sigmoid - dense 3

  Attributes:
    norm: "ours" (``bnjax.BatchNorm``) or "flax" (``flax.linen.BatchNorm``).
    layout: of the convolutional blocks: "NHWC" (features last) or "CHWN" (features first, batch last).
  """

  norm: str = "ours"
  layout: str = "NHWC"

  def _norm(self, x, train: bool, name: str):
    axis = channel_axis(self.layout) if x.ndim == 4 else -1
    layer = bnjax.BatchNorm if self.norm == "ours" else nn.BatchNorm
    return layer(use_running_average=not train, axis=axis, momentum=0.9, epsilon=1e-5, name=name)(x)

  @nn.compact
  def __call__(self, x, train: bool):
    """Logits for NHWC images ``x`` (N, 10, 10, 1)."""
    x = jnp.transpose(x, (3, 1, 2, 0)) if self.layout == "CHWN" else x
    x = LayoutConv(4, self.layout, name="conv1")(x)
    x = nn.avg_pool(nn.sigmoid(self._norm(x, train, "bn1")), (2, 2), (2, 2))  # axes 1, 2 in either layout
    x = nn.sigmoid(self._norm(LayoutConv(6, self.layout, name="conv2")(x), train, "bn2"))
    x = jnp.transpose(x, (3, 1, 2, 0)) if self.layout == "CHWN" else x
    x = x.reshape(x.shape[0], -1)
    x = nn.sigmoid(self._norm(nn.Dense(8, name="fc1")(x), train, "bn3"))
    x = nn.sigmoid(self._norm(nn.Dense(5, name="fc2")(x), train, "bn4"))
    return nn.Dense(3, name="fc3")(x)


def init_cnn(model: TinyCNN, key: jax.Array, batch_size: int = 2) -> dict:
  """The model's variables (``params`` and ``batch_stats``)."""
  return model.init(key, jnp.zeros((batch_size, *CNN_IMAGE), jnp.float32), train=False)


# --- batch-norm layers with random parameters and statistics --------------------------------------------


def random_bn(rng, features, use_scale=True, use_bias=True):
  """A BN layer's ``params`` (scale, bias) and ``batch_stats`` (mean, var), drawn from ``rng``."""
  params = {}
  if use_scale:
    params["scale"] = rng.uniform(0.5, 2, features).astype(np.float32)
  if use_bias:
    params["bias"] = rng.normal(0, 1, features).astype(np.float32)
  stats = {
    "mean": rng.normal(0, 2, features).astype(np.float32),
    "var": rng.uniform(0.1, 5, features).astype(np.float32),
  }
  return params, stats


# --- PyTorch parity (tests/test_torch_parity.py, tests/experiments/test_torch_parity.py) -----------------

SEEDS = [0, 1, 2]
SHAPES = [(32, 7), (16, 5, 6, 6)]  # (N, C) and (N, C, H, W), as in torch
K_STEPS = 3
CHAPTER_MOMENTUM, TORCH_MOMENTUM, EPS = 0.9, 0.1, 1e-5


def to_nhwc(a):
  return np.moveaxis(np.asarray(a), 1, -1)


def from_nhwc(a):
  return np.moveaxis(np.asarray(a), -1, 1)


def bn_inputs(seed, shape, k):
  """k inputs with non-zero per-channel mean and non-unit variance, plus gamma/beta."""
  rng = np.random.default_rng(seed)
  bshape = [1, shape[1]] + [1] * (len(shape) - 2)
  loc, spread = rng.normal(0, 3, bshape), rng.uniform(0.5, 4, bshape)
  xs = [(loc + spread * rng.standard_normal(shape)).astype(np.float32) for _ in range(k)]
  return xs, rng.uniform(0.5, 2, shape[1]).astype(np.float32), rng.normal(0, 1, shape[1]).astype(np.float32)


def to_torch(a):
  """A torch tensor sharing a contiguous copy of ``a`` (torch is imported here, by the parity tests only)."""
  import torch

  return torch.from_numpy(np.ascontiguousarray(a))


# --- the docs' code blocks (tests/test_readme.py, tests/experiments/test_readme.py) ----------------------


def blocks(path: Path, language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


PRINTED = re.compile(r"^(\s*)print\((.*)\)\s+#\s*(.+?)\s*$")  # print(x)  # what it prints


def with_outputs_checked(code: str) -> tuple[str, int]:
  """``code`` with every ``print(...)  # output`` line turned into a check that it prints ``output``; the count."""
  lines = code.splitlines()
  for i, line in enumerate(lines):
    found = PRINTED.match(line)
    if found:
      indent, args, quoted = found.groups()
      lines[i] = f"{indent}__printed__({quoted!r}, {args})"
  return "\n".join(lines), sum(bool(PRINTED.match(line)) for line in code.splitlines())


def printed_as_quoted(quoted: str, *args) -> None:
  got = " ".join(map(str, args))
  assert got == quoted, f"the docs say this prints {quoted!r}, but it prints {got!r}"


def anchors(path: Path) -> set[str]:
  """The anchors GitHub (and MyST) give a Markdown file's headings: lowercase, punctuation dropped, dashes."""
  text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
  titles = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
  return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


def check_relative_links(doc: Path) -> None:
  """Asserts that every relative link of ``doc`` points to a file, and to a heading of it when it names one."""
  for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", doc.read_text()):
    if re.match(r"[a-z]+://", target):
      continue
    path = (doc.parent / target) if target else doc
    assert path.exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"
    if anchor:
      assert anchor in anchors(path), f"{doc.relative_to(ROOT)} links to {target}#{anchor}: no such heading"
