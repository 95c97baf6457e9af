"""The chapter's PyTorch LeNet (``nn.Sequential``) and ours: whole-model weight porting, both ways.

The layer conversions are :mod:`bnjax.porting`'s; this module only knows LeNet's layout: which
PyTorch module index holds which of our layers, and the (c, h, w) flatten before ``fc1``.
As in PyTorch's ``load_state_dict(strict=True)``, :func:`lenet_from_torch` refuses keys it does not
use (``strict=False`` ignores them), and a missing key is named exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bnjax.porting import (
  BN_NAMES,
  StateDictError,
  batch_norm_from_torch,
  batch_norm_to_torch,
  conv_from_torch,
  conv_to_torch,
  dense_from_torch,
  dense_to_torch,
  strip_data_parallel_prefix,
)

# Module names of the chapter's nn.Sequential LeNets, keyed by our LeNet's layer names.
LENET_BN_LAYOUT = {
  "conv1": "0",
  "bn1": "1",
  "conv2": "4",
  "bn2": "5",
  "fc1": "9",
  "bn3": "10",
  "fc2": "12",
  "bn4": "13",
  "fc3": "15",
}
LENET_PLAIN_LAYOUT = {"conv1": "0", "conv2": "3", "fc1": "7", "fc2": "9", "fc3": "11"}
# LeNet's feature map before the flatten, NCHW: 16 channels of 4x4.
LENET_FLATTEN_CHW = (16, 4, 4)


def _accepted_keys(layout: Mapping[str, str]) -> set[str]:
  keys = set()
  for ours, theirs in layout.items():
    names = [n for alternatives in BN_NAMES.values() for n in alternatives] + ["num_batches_tracked"]
    keys |= {f"{theirs}.{n}" for n in (names if ours.startswith("bn") else ("weight", "bias"))}
  return keys


def lenet_from_torch(
  state_dict: Mapping[str, Any],
  layout: Mapping[str, str] | None = None,
  strict: bool = True,
  num_batches_tracked: bool = False,
) -> dict:
  """Variables of :class:`~experiments.lenet_fmnist.models.LeNet` from the chapter's PyTorch LeNet.

  Args:
    state_dict: the PyTorch model's ``state_dict()`` (tensors or NumPy arrays). The chapter's
      scratch BatchNorm keeps ``moving_mean``/``moving_var`` as plain attributes, not buffers:
      add them as ``"<i>.moving_mean"``/``"<i>.moving_var"``. A ``module.`` prefix on every key
      (DataParallel) is removed.
    layout: our layer name -> PyTorch module name; defaults to the chapter's ``nn.Sequential``
      with BatchNorm when module ``1`` has parameters, else the plain LeNet.
    strict: refuse keys that the layout does not use (PyTorch's ``strict``); False ignores them.
    num_batches_tracked: keep each BN layer's ``num_batches_tracked`` in its ``batch_stats``.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` (no ``batch_stats`` for the plain LeNet).

  Raises:
    StateDictError (a KeyError): a missing key, named; with ``strict``, unexpected keys, listed.
  """
  state_dict = strip_data_parallel_prefix(state_dict)
  if layout is None:
    # Any BN-only key (a running statistic, the chapter's gamma/beta, a counter) means the BN LeNet, even
    # when one BN layer's keys are all missing: those are then named as missing, not the rest unexpected.
    bn_only = {n for names in BN_NAMES.values() for n in names if n not in ("weight", "bias")} | {"num_batches_tracked"}
    has_bn = any(k.rsplit(".", 1)[-1] in bn_only for k in state_dict)
    layout = LENET_BN_LAYOUT if has_bn else LENET_PLAIN_LAYOUT
  missing = [
    " or ".join(repr(f"{theirs}.{n}") for n in names)
    for ours, theirs in layout.items()
    for names in (BN_NAMES.values() if ours.startswith("bn") else (("weight",), ("bias",)))
    if not any(f"{theirs}.{n}" in state_dict for n in names)
  ]
  if missing:
    modules = {m.split(".")[0].strip("'") for m in missing}
    near = sorted(k for k in state_dict if k.split(".")[0] in modules)
    raise StateDictError(
      f"state_dict is missing {len(missing)} key(s) of LeNet: {', '.join(missing)}; keys of those modules: "
      f"{near or 'none'}."
    )
  if strict:
    unexpected = sorted(set(state_dict) - _accepted_keys(layout))
    if unexpected:
      hint = ""
      if any(k.startswith("module.") for k in unexpected):
        hint = " (nn.DataParallel's 'module.' prefix is removed only when every key has it)"
      raise StateDictError(
        f"state_dict has keys that LeNet does not use: {unexpected}{hint}. Pass strict=False to ignore them."
      )
  params, stats = {}, {}
  for ours, theirs in layout.items():
    if ours.startswith("conv"):
      params[ours] = conv_from_torch(state_dict, theirs)
    elif ours.startswith("fc"):
      params[ours] = dense_from_torch(state_dict, theirs, LENET_FLATTEN_CHW if ours == "fc1" else None)
    elif ours.startswith("bn"):
      params[ours], stats[ours] = batch_norm_from_torch(state_dict, theirs, num_batches_tracked)
    else:
      raise ValueError(f"`layout` names layer {ours!r}; LeNet's layers are conv1, conv2, fc1..fc3 and bn1..bn4.")
  return {"params": params, "batch_stats": stats} if stats else {"params": params}


def lenet_to_torch(variables: Mapping[str, Any], layout: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
  """The chapter's PyTorch LeNet ``state_dict`` (NumPy arrays) from our LeNet's variables.

  The inverse of :func:`lenet_from_torch` for ``nn.BatchNorm`` models (``running_*`` names); the layout
  defaults to the BN LeNet's when ``variables`` has ``batch_stats``, else the plain LeNet's.
  """
  params, stats = variables["params"], variables.get("batch_stats", {})
  if layout is None:
    layout = LENET_BN_LAYOUT if stats else LENET_PLAIN_LAYOUT
  state_dict: dict[str, np.ndarray] = {}
  for ours, theirs in layout.items():
    if ours not in params:
      raise KeyError(f"`variables['params']` has no layer {ours!r}; it has {sorted(params)}.")
    if ours.startswith("conv"):
      state_dict |= conv_to_torch(params[ours], theirs)
    elif ours.startswith("fc"):
      state_dict |= dense_to_torch(params[ours], theirs, LENET_FLATTEN_CHW if ours == "fc1" else None)
    else:
      state_dict |= batch_norm_to_torch(params[ours], stats[ours], theirs)
  return state_dict
