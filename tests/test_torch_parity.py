"""Parity with PyTorch: torch.nn.functional.batch_norm, autograd, nn.BatchNorm1d/2d and the PyTorch preset
(the chapter's own code and LeNet: tests/experiments/test_torch_parity.py).

torch is imported unconditionally: without it this module fails to collect, loudly (no silent skip).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnjax import BatchNorm, batch_norm, init_batch_stats, pytorch_preset
from bnjax.porting import batch_norm_from_torch, batch_norm_to_torch
from tests.helpers import CHAPTER_MOMENTUM, EPS, K_STEPS, SEEDS, SHAPES, TORCH_MOMENTUM, from_nhwc, to_nhwc
from tests.helpers import bn_inputs as batches
from tests.helpers import to_torch as t
from tests.tolerance import assert_close_and_record


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCHW"])
def test_train_steps_then_eval_match_torch_functional(seed, shape):
  xs, gamma, beta = batches(seed, shape, K_STEPS + 1)
  c = shape[1]
  running_mean, running_var = torch.zeros(c), torch.ones(c)
  stats_nchw = stats_nhwc = init_batch_stats(c)
  kw = dict(momentum=CHAPTER_MOMENTUM, epsilon=EPS, unbiased_running_var=True)
  for x in xs[:K_STEPS]:
    y_t = F.batch_norm(t(x), running_mean, running_var, t(gamma), t(beta), True, TORCH_MOMENTUM, EPS)
    y_a, stats_nchw = batch_norm(x, gamma, beta, stats_nchw, use_running_average=False, axis=1, **kw)
    y_b, stats_nhwc = batch_norm(to_nhwc(x), gamma, beta, stats_nhwc, use_running_average=False, axis=-1, **kw)
    assert_close_and_record("op F.batch_norm train output (axis=1)", y_a, y_t.numpy())
    assert_close_and_record("op F.batch_norm train output (NHWC)", from_nhwc(y_b), y_t.numpy())
  expected_stats = (running_mean.numpy(), running_var.numpy())
  assert_close_and_record(
    f"op running stats after {K_STEPS} steps (unbiased)", (stats_nchw.mean, stats_nchw.var), expected_stats
  )
  assert_close_and_record(
    f"op running stats after {K_STEPS} steps (unbiased)", (stats_nhwc.mean, stats_nhwc.var), expected_stats
  )

  x = xs[-1]
  y_t = F.batch_norm(t(x), running_mean, running_var, t(gamma), t(beta), False, TORCH_MOMENTUM, EPS)
  y_a, _ = batch_norm(x, gamma, beta, stats_nchw, use_running_average=True, axis=1, epsilon=EPS)
  y_b, _ = batch_norm(to_nhwc(x), gamma, beta, stats_nhwc, use_running_average=True, epsilon=EPS)
  assert_close_and_record("op F.batch_norm eval output", y_a, y_t.numpy())
  assert_close_and_record("op F.batch_norm eval output", from_nhwc(y_b), y_t.numpy())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCHW"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradients_match_torch_autograd(seed, shape, train):
  (x,), gamma, beta = batches(seed, shape, 1)
  rng = np.random.default_rng(seed + 100)
  proj = rng.standard_normal(shape).astype(np.float32)  # a random scalar projection of the output
  rm, rv = rng.normal(0, 1, shape[1]).astype(np.float32), rng.uniform(0.5, 3, shape[1]).astype(np.float32)

  xt, gt, bt = (t(a).requires_grad_(True) for a in (x, gamma, beta))
  y = F.batch_norm(xt, t(rm).clone(), t(rv).clone(), gt, bt, train, TORCH_MOMENTUM, EPS)
  (y * t(proj)).sum().backward()

  def loss(x, gamma, beta, axis):
    xin = jnp.moveaxis(x, 1, -1) if axis == -1 else x
    y, _ = batch_norm(
      jnp.asarray(xin),
      gamma,
      beta,
      init_batch_stats(shape[1])._replace(mean=rm, var=rv),
      use_running_average=not train,
      axis=axis,
      epsilon=EPS,
    )
    p = to_nhwc(proj) if axis == -1 else proj
    return jnp.sum(y * p)

  expected = (xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy())
  for axis in (1, -1):
    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), gamma, beta, axis)
    assert_close_and_record(
      f"op gradients wrt x, scale, bias ({'train' if train else 'eval'})", grads, expected, "framework"
    )


@pytest.mark.parametrize("shape", SHAPES, ids=["BatchNorm1d", "BatchNorm2d"])
def test_nn_batchnorm_modules_match(shape):
  xs, gamma, beta = batches(7, shape, K_STEPS + 1)
  module = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(shape[1])
  with torch.no_grad():
    module.weight.copy_(t(gamma))
    module.bias.copy_(t(beta))
  stats = init_batch_stats(shape[1])
  for x in xs[:K_STEPS]:
    y_t = module.train()(t(x)).detach().numpy()
    y, stats = batch_norm(
      x,
      gamma,
      beta,
      stats,
      use_running_average=False,
      axis=1,
      unbiased_running_var=True,
      momentum=1 - module.momentum,
      epsilon=module.eps,
    )
    assert_close_and_record("op nn.BatchNorm1d/2d train output", y, y_t)
  assert_close_and_record(
    "op nn.BatchNorm1d/2d running stats",
    (stats.mean, stats.var),
    (module.running_mean.numpy(), module.running_var.numpy()),
  )
  y_t = module.eval()(t(xs[-1])).detach().numpy()
  assert_close_and_record(
    "op nn.BatchNorm1d/2d eval output", batch_norm(xs[-1], gamma, beta, stats, use_running_average=True, axis=1)[0], y_t
  )


@pytest.mark.parametrize("torch_momentum", [0.1, 0.3, None], ids=["default", "0.3", "cumulative"])
def test_the_pytorch_preset_is_nn_batchnorm_counter_included(torch_momentum):
  shape = (16, 5, 6, 6)
  xs, gamma, beta = batches(11, shape, K_STEPS + 1)
  module = torch.nn.BatchNorm2d(shape[1], momentum=torch_momentum, eps=1e-3)
  layer = BatchNorm(axis=1, **pytorch_preset(torch_momentum, eps=1e-3))
  variables = layer.init(jax.random.key(0), xs[0], use_running_average=False)
  variables = {"params": {"scale": gamma, "bias": beta}, "batch_stats": variables["batch_stats"]}
  with torch.no_grad():
    module.weight.copy_(t(gamma))
    module.bias.copy_(t(beta))
  for x in xs[:K_STEPS]:
    y_t = module.train()(t(x)).detach().numpy()
    y, updates = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    variables = {**variables, **updates}
    assert_close_and_record("preset nn.BatchNorm2d train output", y, y_t)
  # Our state exported through bnjax.porting loads into the torch module strictly, counter included.
  exported = batch_norm_to_torch(variables["params"], variables["batch_stats"], "bn")
  theirs = {f"bn.{k}": v.numpy() for k, v in module.state_dict().items()}
  assert int(exported["bn.num_batches_tracked"]) == int(theirs["bn.num_batches_tracked"]) == K_STEPS
  assert_close_and_record("preset running stats", exported, theirs)
  fresh = torch.nn.BatchNorm2d(shape[1], momentum=torch_momentum, eps=1e-3)
  fresh.load_state_dict({k.removeprefix("bn."): t(v) for k, v in exported.items()}, strict=True)
  y_eval = layer.apply(variables, xs[-1], use_running_average=True)
  assert_close_and_record("preset nn.BatchNorm2d eval output", y_eval, fresh.eval()(t(xs[-1])).detach().numpy())
  # And back: torch's state imports with its counter, for training on where PyTorch stopped.
  params, stats = batch_norm_from_torch({f"bn.{k}": v for k, v in module.state_dict().items()}, "bn", True)
  assert stats["num_batches_tracked"] == K_STEPS
  assert_close_and_record(
    "preset running stats", (params, stats), (variables["params"], dict(variables["batch_stats"]))
  )
