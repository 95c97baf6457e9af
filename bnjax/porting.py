"""Import PyTorch weights: a ``state_dict`` in, Flax ``params`` and ``batch_stats`` out.

bnjax never imports torch: pass the state dict's tensors as they are (anything with ``.detach()``
is converted through ``.detach().cpu().numpy()``) or already as NumPy arrays. The layout
conversions are:

* convolution kernels: PyTorch OIHW -> Flax HWIO;
* linear weights: PyTorch (out, in) -> Flax (in, out); for the first dense layer after a flatten,
  the input features are also reordered from PyTorch's NCHW flatten order (c, h, w) to NHWC's
  (h, w, c);
* batch norm: ``weight``/``bias`` (or the chapter's ``gamma``/``beta``, of shape (1, C[, 1, 1]))
  -> ``scale``/``bias``; ``running_mean``/``running_var`` (or ``moving_mean``/``moving_var``) ->
  ``batch_stats`` ``mean``/``var``; ``num_batches_tracked`` is ignored.

As in PyTorch's ``load_state_dict(strict=True)``, :func:`lenet_from_torch` refuses keys it does not
use (``strict=False`` ignores them), and a missing key is named exactly. A ``module.`` prefix on every
key (``nn.DataParallel`` / ``DistributedDataParallel``) is removed.

Remember that PyTorch's ``momentum`` is ``1 - `` bnjax's and that ``nn.BatchNorm*`` updates the running
variance with the unbiased batch variance: use ``momentum=0.9, unbiased_running_var=True`` (the
LeNet's ``unbiased_running_var=True``) to keep training a ported ``nn.BatchNorm`` model the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

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

_BN_NAMES = {
  "scale": ("weight", "gamma"),
  "bias": ("bias", "beta"),
  "mean": ("running_mean", "moving_mean"),
  "var": ("running_var", "moving_var"),
}


class StateDictError(KeyError):
  """A state dict that does not fit the model: a missing or an unexpected key (message names it)."""

  def __str__(self) -> str:  # KeyError would print the message in quotes
    return str(self.args[0])


def to_numpy(value: Any) -> np.ndarray:
  """A tensor or array as float32 NumPy, without importing torch."""
  if hasattr(value, "detach"):
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def _get(state_dict: Mapping[str, Any], key: str, shape_hint: str) -> np.ndarray:
  if key not in state_dict:
    near = sorted(k for k in state_dict if k.split(".")[0] == key.split(".")[0])
    raise StateDictError(f"state_dict has no {key!r} ({shape_hint}); keys of that module: {near or 'none'}.")
  return to_numpy(state_dict[key])


def _expect_ndim(name: str, array: np.ndarray, ndim: int, what: str) -> None:
  if array.ndim != ndim:
    raise ValueError(f"`{name}` has shape {array.shape}, but a {what} has {ndim} dimensions.")


def conv_from_torch(state_dict: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
  """``{prefix}.weight`` (O, I, H, W) and ``{prefix}.bias`` -> ``{"kernel": (H, W, I, O), "bias"}``."""
  w = _get(state_dict, f"{prefix}.weight", "conv weight, OIHW")
  _expect_ndim(f"{prefix}.weight", w, 4, "Conv2d weight (out, in, kh, kw)")
  return {"kernel": w.transpose(2, 3, 1, 0), "bias": _get(state_dict, f"{prefix}.bias", "conv bias")}


def dense_from_torch(
  state_dict: Mapping[str, Any], prefix: str, flatten_chw: tuple[int, int, int] | None = None
) -> dict[str, np.ndarray]:
  """``{prefix}.weight`` (out, in) -> ``{"kernel": (in, out), "bias"}``.

  With ``flatten_chw=(C, H, W)``, the layer follows a flatten of an NCHW map, and its inputs are
  reordered to the NHWC flatten order.
  """
  w = _get(state_dict, f"{prefix}.weight", "linear weight, (out, in)")
  _expect_ndim(f"{prefix}.weight", w, 2, "Linear weight (out, in)")
  if flatten_chw is not None:
    if w.shape[1] != int(np.prod(flatten_chw)):
      raise ValueError(
        f"`{prefix}.weight` has shape {w.shape}, but a flatten of {flatten_chw} gives "
        f"{int(np.prod(flatten_chw))} inputs."
      )
    c, h, wd = flatten_chw
    w = w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
  return {"kernel": w.T, "bias": _get(state_dict, f"{prefix}.bias", "linear bias")}


def batch_norm_from_torch(state_dict: Mapping[str, Any], prefix: str) -> tuple[dict, dict]:
  """A PyTorch or chapter BatchNorm -> ``(params {scale, bias}, batch_stats {mean, var})``."""
  out = {}
  for ours, names in _BN_NAMES.items():
    key = next((f"{prefix}.{n}" for n in names if f"{prefix}.{n}" in state_dict), None)
    if key is None:
      near = sorted(k for k in state_dict if k.split(".")[0] == prefix)
      raise StateDictError(
        f"state_dict has no {' or '.join(repr(f'{prefix}.{n}') for n in names)} for a BatchNorm layer; "
        f"keys of that module: {near or 'none'}."
      )
    out[ours] = to_numpy(state_dict[key]).reshape(-1)  # the chapter stores (1, C, 1, 1)
  sizes = {k: v.size for k, v in out.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"BatchNorm {prefix!r} has inconsistent feature counts: {sizes}.")
  return {"scale": out["scale"], "bias": out["bias"]}, {"mean": out["mean"], "var": out["var"]}


def strip_data_parallel_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """The state dict without the ``module.`` prefix that ``nn.DataParallel`` puts on every key."""
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return {k.removeprefix("module."): v for k, v in state_dict.items()}
  return state_dict


def _accepted_keys(layout: Mapping[str, str]) -> set[str]:
  keys = set()
  for ours, theirs in layout.items():
    names = [n for alternatives in _BN_NAMES.values() for n in alternatives] + ["num_batches_tracked"]
    keys |= {f"{theirs}.{n}" for n in (names if ours.startswith("bn") else ("weight", "bias"))}
  return keys


def lenet_from_torch(
  state_dict: Mapping[str, Any], layout: Mapping[str, str] | None = None, strict: bool = True
) -> dict:
  """Variables of :class:`bnjax.models.LeNet` from the chapter's PyTorch LeNet.

  Args:
    state_dict: the PyTorch model's ``state_dict()`` (tensors or NumPy arrays). The chapter's
      scratch BatchNorm keeps ``moving_mean``/``moving_var`` as plain attributes, not buffers:
      add them as ``"<i>.moving_mean"``/``"<i>.moving_var"``. A ``module.`` prefix on every key
      (DataParallel) is removed.
    layout: our layer name -> PyTorch module name; defaults to the chapter's ``nn.Sequential``
      with BatchNorm when module ``1`` has parameters, else the plain LeNet.
    strict: refuse keys that the layout does not use (PyTorch's ``strict``); False ignores them.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` (no ``batch_stats`` for the plain LeNet).

  Raises:
    StateDictError (a KeyError): a missing key, named; with ``strict``, unexpected keys, listed.
  """
  state_dict = strip_data_parallel_prefix(state_dict)
  if layout is None:
    # Module 1 is the first BatchNorm, or a Sigmoid (no keys) in the plain LeNet.
    has_bn = any(k.split(".")[0] == LENET_BN_LAYOUT["bn1"] for k in state_dict)
    layout = LENET_BN_LAYOUT if has_bn else LENET_PLAIN_LAYOUT
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
      params[ours], stats[ours] = batch_norm_from_torch(state_dict, theirs)
    else:
      raise ValueError(f"`layout` names layer {ours!r}; LeNet's layers are conv1, conv2, fc1..fc3 and bn1..bn4.")
  return {"params": params, "batch_stats": stats} if stats else {"params": params}
