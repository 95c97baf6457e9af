"""PyTorch weights in and out: a ``state_dict`` to Flax ``params`` and ``batch_stats``, and back.

bnjax never imports torch: pass the state dict's tensors as they are (anything with ``.detach()``
is converted through ``.detach().cpu().numpy()``) or already as NumPy arrays. The layout
conversions are:

* convolution kernels: PyTorch OIHW -> Flax HWIO;
* linear weights: PyTorch (out, in) -> Flax (in, out); for the first dense layer after a flatten,
  the input features are also reordered from PyTorch's NCHW flatten order (c, h, w) to NHWC's
  (h, w, c);
* batch norm: ``weight``/``bias`` (or the chapter's ``gamma``/``beta``, of shape (1, C[, 1, 1]))
  -> ``scale``/``bias``; ``running_mean``/``running_var`` (or ``moving_mean``/``moving_var``) ->
  ``batch_stats`` ``mean``/``var``; ``num_batches_tracked`` becomes ``batch_stats``
  ``num_batches_tracked`` when asked for (``num_batches_tracked=True``, for layers with
  ``track_num_batches`` or ``momentum=None``), and is ignored otherwise.

The ``*_to_torch`` functions go the other way and return NumPy arrays (``torch.from_numpy`` each, or
``{k: torch.tensor(v) ...}``) for ``load_state_dict``; a BN layer without a counter exports 0.

A missing key is named exactly, and so is a tensor of the wrong shape, with the shape expected (a bias
of another length than the weight's outputs, a BatchNorm statistic that is not one value per feature, a
``flatten_chw`` that does not match the kernel). :func:`strip_data_parallel_prefix` removes the
``module.`` prefix that ``nn.DataParallel`` / ``DistributedDataParallel`` put on every key. A whole
model is a mapping of layer names to these conversions (the chapter's LeNet:
``experiments/lenet_fmnist/porting.py``).

Remember that PyTorch's ``momentum`` is ``1 - `` bnjax's and that ``nn.BatchNorm*`` updates the running
variance with the unbiased batch variance: use ``momentum=0.9, unbiased_running_var=True`` to keep
training a ported ``nn.BatchNorm`` model the same way;
``bnjax.pytorch_preset(momentum, eps)`` gives all of these at once, counter included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

BN_NAMES = {
  "scale": ("weight", "gamma"),
  "bias": ("bias", "beta"),
  "mean": ("running_mean", "moving_mean"),
  "var": ("running_var", "moving_var"),
}


class StateDictError(KeyError):
  """A state dict (or, on export, a layer's variables) that does not fit: a missing or an unexpected key, named."""

  def __str__(self) -> str:  # KeyError would print the message in quotes
    return str(self.args[0])


def to_numpy(value: Any, dtype: Any = np.float32) -> np.ndarray:
  """A tensor or array as a NumPy copy (float32 unless ``dtype`` says otherwise; None keeps it), without torch."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) in ("torch.bfloat16", "torch.float16") and dtype is not None:
      value = value.float()  # NumPy has no bfloat16: widen in torch, exactly, then convert
    value = value.numpy()
  return np.array(value, dtype)  # a writable copy: torch.from_numpy warns on read-only arrays


def _get(state_dict: Mapping[str, Any], key: str, shape_hint: str) -> np.ndarray:
  if key not in state_dict:
    near = sorted(k for k in state_dict if k.split(".")[0] == key.split(".")[0])
    raise StateDictError(f"state_dict has no {key!r} ({shape_hint}); keys of that module: {near or 'none'}.")
  return to_numpy(state_dict[key])


def _expect_ndim(name: str, array: np.ndarray, ndim: int, what: str) -> None:
  if array.ndim != ndim:
    raise ValueError(f"`{name}` has shape {array.shape}, but a {what} has {ndim} dimensions.")


def _expect_bias(name: str, bias: np.ndarray, weight_name: str, weight: np.ndarray, outputs: int, what: str) -> None:
  """A bias has one value per output: shape ``(outputs,)``."""
  if bias.shape != (outputs,):
    raise ValueError(
      f"`{name}` has shape {bias.shape}, but should be ({outputs},): one per {what} of `{weight_name}` {weight.shape}."
    )


def _param(variables: Mapping[str, Any], argument: str, key: str, what: str) -> np.ndarray:
  """``variables[key]`` as NumPy; a missing key names ``argument``, what it is for and the keys there are."""
  if key not in variables:
    raise StateDictError(f"`{argument}` has no {key!r} ({what}); it has {sorted(variables)}.")
  return to_numpy(variables[key])


def conv_from_torch(state_dict: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
  """``{prefix}.weight`` (O, I, H, W) and ``{prefix}.bias`` -> ``{"kernel": (H, W, I, O), "bias"}``."""
  w = _get(state_dict, f"{prefix}.weight", "conv weight, OIHW")
  _expect_ndim(f"{prefix}.weight", w, 4, "Conv2d weight (out, in, kh, kw)")
  b = _get(state_dict, f"{prefix}.bias", "conv bias")
  _expect_bias(f"{prefix}.bias", b, f"{prefix}.weight", w, w.shape[0], "output channel")
  return {"kernel": w.transpose(2, 3, 1, 0), "bias": b}


def dense_from_torch(
  state_dict: Mapping[str, Any], prefix: str, flatten_chw: tuple[int, int, int] | None = None
) -> dict[str, np.ndarray]:
  """``{prefix}.weight`` (out, in) -> ``{"kernel": (in, out), "bias"}``.

  With ``flatten_chw=(C, H, W)``, the layer follows a flatten of an NCHW map, and its inputs are
  reordered to the NHWC flatten order.
  """
  w = _get(state_dict, f"{prefix}.weight", "linear weight, (out, in)")
  _expect_ndim(f"{prefix}.weight", w, 2, "Linear weight (out, in)")
  b = _get(state_dict, f"{prefix}.bias", "linear bias")
  _expect_bias(f"{prefix}.bias", b, f"{prefix}.weight", w, w.shape[0], "output")
  if flatten_chw is not None:
    if w.shape[1] != int(np.prod(flatten_chw)):
      raise ValueError(
        f"`{prefix}.weight` has shape {w.shape}, but a flatten of {flatten_chw} gives "
        f"{int(np.prod(flatten_chw))} inputs."
      )
    c, h, wd = flatten_chw
    w = w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
  return {"kernel": w.T, "bias": b}


def batch_norm_from_torch(
  state_dict: Mapping[str, Any], prefix: str, num_batches_tracked: bool = False
) -> tuple[dict, dict]:
  """A PyTorch or chapter BatchNorm -> ``(params {scale, bias}, batch_stats {mean, var})``.

  With ``num_batches_tracked=True``, ``batch_stats`` also holds PyTorch's counter (int32), which the
  state dict must then have.
  """
  raw = {}
  for names in BN_NAMES.values():
    key = next((f"{prefix}.{n}" for n in names if f"{prefix}.{n}" in state_dict), None)
    if key is None:
      near = sorted(k for k in state_dict if k.split(".")[0] == prefix)
      raise StateDictError(
        f"state_dict has no {' or '.join(repr(f'{prefix}.{n}') for n in names)} for a BatchNorm layer; "
        f"keys of that module: {near or 'none'}."
      )
    raw[key] = to_numpy(state_dict[key])
  out = dict(zip(BN_NAMES, _per_feature(raw).values(), strict=True))
  sizes = {k: v.size for k, v in out.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"BatchNorm {prefix!r} has inconsistent feature counts: {sizes}.")
  stats = {"mean": out["mean"], "var": out["var"]}
  if num_batches_tracked:
    key = f"{prefix}.num_batches_tracked"
    if key not in state_dict:
      raise StateDictError(
        f"state_dict has no {key!r}, but num_batches_tracked=True asks for PyTorch's batch counter "
        "(the chapter's scratch BatchNorm has none: pass num_batches_tracked=False)."
      )
    value = to_numpy(state_dict[key], dtype=None)
    if value.size != 1 or not np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"`{key}` has shape {value.shape} and dtype {value.dtype}, but should be an integer count.")
    count = int(value.reshape(()))
    if not 0 <= count <= np.iinfo(np.int32).max:
      raise ValueError(
        f"`{key}` is {count}, but bnjax keeps the batch counter as int32 (0..{np.iinfo(np.int32).max}); "
        "a larger count would wrap around."
      )
    stats["num_batches_tracked"] = np.asarray(count, np.int32)
  return {"scale": out["scale"], "bias": out["bias"]}, stats


def _per_feature(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """BatchNorm tensors by key as ``(C,)``: PyTorch's ``(C,)`` or the chapter's ``(1, C)`` / ``(1, C, 1, 1)``.

  A tensor with more than one axis longer than 1 is refused (it would flatten into the wrong features).
  """
  one_axis = [a.size for a in tensors.values() if sum(d != 1 for d in a.shape) <= 1]
  c = str(one_axis[0]) if one_axis else "C"
  for key, array in tensors.items():
    if sum(d != 1 for d in array.shape) > 1:
      raise ValueError(
        f"`{key}` has shape {array.shape}, but should be ({c},) (or (1, {c}) / (1, {c}, 1, 1), "
        "as the chapter's scratch BatchNorm stores it): one value per feature."
      )
  return {key: array.reshape(-1) for key, array in tensors.items()}


def conv_to_torch(params: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
  """``{"kernel": (H, W, I, O), "bias"}`` -> ``{prefix}.weight`` (O, I, H, W) and ``{prefix}.bias``."""
  w = _param(params, "params", "kernel", f"a Conv layer's, for {prefix + '.weight'!r}")
  _expect_ndim("kernel", w, 4, "Conv kernel (kh, kw, in, out)")
  b = _param(params, "params", "bias", f"a Conv layer's, for {prefix + '.bias'!r}")
  _expect_bias("bias", b, "kernel", w, w.shape[3], "output channel")
  return {f"{prefix}.weight": w.transpose(3, 2, 0, 1), f"{prefix}.bias": b}


def dense_to_torch(
  params: Mapping[str, Any], prefix: str, flatten_chw: tuple[int, int, int] | None = None
) -> dict[str, np.ndarray]:
  """``{"kernel": (in, out), "bias"}`` -> ``{prefix}.weight`` (out, in); inverse of :func:`dense_from_torch`."""
  kernel = _param(params, "params", "kernel", f"a Dense layer's, for {prefix + '.weight'!r}")
  _expect_ndim("kernel", kernel, 2, "Dense kernel (in, out)")
  b = _param(params, "params", "bias", f"a Dense layer's, for {prefix + '.bias'!r}")
  _expect_bias("bias", b, "kernel", kernel, kernel.shape[1], "output")
  w = kernel.T
  if flatten_chw is not None:
    inputs = int(np.prod(flatten_chw))
    if kernel.shape[0] != inputs:
      raise ValueError(
        f"`flatten_chw` is {tuple(flatten_chw)}, which gives {inputs} inputs, but `kernel` has shape "
        f"{kernel.shape}: {kernel.shape[0]} inputs."
      )
    c, h, wd = flatten_chw
    w = w.reshape(w.shape[0], h, wd, c).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)
  return {f"{prefix}.weight": w, f"{prefix}.bias": b}


def batch_norm_to_torch(params: Mapping[str, Any], stats: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
  """``params {scale, bias}`` and ``batch_stats`` -> ``nn.BatchNorm*`` keys, the counter as int64 (0 if absent).

  PyTorch's ``nn.BatchNorm*`` (``affine=True``) keeps a weight and a bias, so a layer built with
  ``use_scale=False`` or ``use_bias=False`` is refused, naming what is missing.
  """
  tensors = {}
  for argument, variables, ours, theirs in (
    ("params", params, "scale", "weight"),
    ("params", params, "bias", "bias"),
    ("stats", stats, "mean", "running_mean"),
    ("stats", stats, "var", "running_var"),
  ):
    tensors[ours] = _param(variables, argument, ours, f"a BatchNorm layer's, for {f'{prefix}.{theirs}'!r}")
    if tensors[ours].ndim != 1:
      want = tensors["scale"].shape if tensors["scale"].ndim == 1 else "(C,)"
      raise ValueError(f"`{ours}` has shape {tensors[ours].shape}, but should be {want}: one value per feature.")
    if tensors[ours].shape != tensors["scale"].shape:
      raise ValueError(
        f"`{ours}` has shape {tensors[ours].shape}, but should be {tensors['scale'].shape} (the shape of `scale`)."
      )
  counter = stats.get("num_batches_tracked")
  return {
    f"{prefix}.weight": tensors["scale"],
    f"{prefix}.bias": tensors["bias"],
    f"{prefix}.running_mean": tensors["mean"],
    f"{prefix}.running_var": tensors["var"],
    f"{prefix}.num_batches_tracked": np.array(0 if counter is None else counter, np.int64),
  }


def strip_data_parallel_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """The state dict without the ``module.`` prefix that ``nn.DataParallel`` puts on every key."""
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return {k.removeprefix("module."): v for k, v in state_dict.items()}
  return state_dict
