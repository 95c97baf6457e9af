"""The chapter's PyTorch code (D2L "Batch Normalization"), unchanged in behaviour: the parity reference and the
benchmark's PyTorch rows. Needs torch (a test-only dependency; bnjax itself never imports it).

Only the `d2l` import is gone (nothing from it is used here) and the comments are translated. The
chapter chooses train/eval mode with `torch.is_grad_enabled()`: call it under `torch.no_grad()` for
evaluation.
"""

import torch
from torch import nn


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
  # Use is_grad_enabled to tell training mode from prediction mode
  if not torch.is_grad_enabled():
    # In prediction mode, use the moving averages passed in
    X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
  else:
    assert len(X.shape) in (2, 4)
    if len(X.shape) == 2:
      # Fully connected layer: mean and variance over the feature dimension
      mean = X.mean(dim=0)
      var = ((X - mean) ** 2).mean(dim=0)
    else:
      # 2-D convolution: mean and variance per channel (axis=1), keeping X's shape for broadcasting
      mean = X.mean(dim=(0, 2, 3), keepdim=True)
      var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    # In training mode, standardize with the current mean and variance
    X_hat = (X - mean) / torch.sqrt(var + eps)
    # Update the moving averages
    moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
    moving_var = momentum * moving_var + (1.0 - momentum) * var
  Y = gamma * X_hat + beta  # scale and shift
  return Y, moving_mean.data, moving_var.data


class BatchNorm(nn.Module):
  # num_features: outputs of a fully connected layer or output channels of a convolution.
  # num_dims: 2 for a fully connected layer, 4 for a convolution
  def __init__(self, num_features, num_dims):
    super().__init__()
    if num_dims == 2:
      shape = (1, num_features)
    else:
      shape = (1, num_features, 1, 1)
    # Scale and shift parameters take part in gradients and updates; initialized to 1 and 0
    self.gamma = nn.Parameter(torch.ones(shape))
    self.beta = nn.Parameter(torch.zeros(shape))
    # Variables that are not model parameters are initialized to 0 and 1
    self.moving_mean = torch.zeros(shape)
    self.moving_var = torch.ones(shape)

  def forward(self, X):
    # If X is not in main memory, copy moving_mean and moving_var to its device
    if self.moving_mean.device != X.device:
      self.moving_mean = self.moving_mean.to(X.device)
      self.moving_var = self.moving_var.to(X.device)
    # Save the updated moving_mean and moving_var
    Y, self.moving_mean, self.moving_var = batch_norm(
      X, self.gamma, self.beta, self.moving_mean, self.moving_var, eps=1e-5, momentum=0.9
    )
    return Y


def lenet_scratch_bn():
  """The chapter's LeNet with its own BatchNorm."""
  return nn.Sequential(
      nn.Conv2d(1, 6, kernel_size=5), BatchNorm(6, num_dims=4), nn.Sigmoid(),
      nn.AvgPool2d(kernel_size=2, stride=2),
      nn.Conv2d(6, 16, kernel_size=5), BatchNorm(16, num_dims=4), nn.Sigmoid(),
      nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),
      nn.Linear(16 * 4 * 4, 120), BatchNorm(120, num_dims=2), nn.Sigmoid(),
      nn.Linear(120, 84), BatchNorm(84, num_dims=2), nn.Sigmoid(),
      nn.Linear(84, 10))  # fmt: skip


def lenet_torch_bn():
  """The chapter's concise LeNet with nn.BatchNorm2d/1d."""
  return nn.Sequential(
      nn.Conv2d(1, 6, kernel_size=5), nn.BatchNorm2d(6), nn.Sigmoid(),
      nn.AvgPool2d(kernel_size=2, stride=2),
      nn.Conv2d(6, 16, kernel_size=5), nn.BatchNorm2d(16), nn.Sigmoid(),
      nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),
      nn.Linear(256, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
      nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(),
      nn.Linear(84, 10))  # fmt: skip


def init_like_train_ch6(net, seed):
  """Xavier-uniform weights, as the chapter's train_ch6 does (biases keep PyTorch's default init)."""
  torch.manual_seed(seed)
  for m in net.modules():
    if type(m) in (nn.Linear, nn.Conv2d):
      nn.init.xavier_uniform_(m.weight)
  return net


def full_state_dict(net):
  """state_dict() plus the chapter's moving averages, which are attributes rather than buffers."""
  sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
  for name, m in net.named_children():
    if isinstance(m, BatchNorm):
      sd[f"{name}.moving_mean"], sd[f"{name}.moving_var"] = m.moving_mean.clone(), m.moving_var.clone()
  return sd
