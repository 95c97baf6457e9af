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


def nchw_tensor(images):
  """NHWC ``(N, 28, 28, 1)`` images as the NCHW float32 tensor the chapter's DataLoader yields.

  Built from the (N, 28, 28) pixels with ``unsqueeze(1)``, as ``ToTensor`` does: an ``np.moveaxis`` view
  leaves the size-1 channel axis with stride 1, which PyTorch takes for channels-last memory, and then
  its convolutions run ~1.4x slower on CPU (measured); the check below keeps that from coming back.
  """
  import numpy as np

  x = torch.from_numpy(np.array(images[..., 0], dtype=np.float32)).unsqueeze(1)
  # The strides a DataLoader's batch has; moveaxis would give (784, 1, 28, 1). (With one channel both
  # layouts pass `is_contiguous(memory_format=torch.channels_last)`, so compare strides.)
  assert x.stride() == torch.empty(x.shape).stride(), x.stride()
  return x


def train_ch6(net, dataset, *, epochs=10, lr=1.0, batch_size=256, seed=0, log=print, device="cpu"):
  """The chapter's `d2l.train_ch6` loop on in-memory tensors: SGD, cross-entropy, per-epoch test accuracy.

  Returns the per-epoch history (train loss, train acc, test acc, seconds). The data are the same
  IDX files bnjax reads, as NCHW float32 tensors; shuffling uses `torch.randperm`, as a shuffled
  DataLoader would, without worker processes.
  """
  import time

  import numpy as np

  torch.manual_seed(seed)
  train_x, test_x = nchw_tensor(dataset.train_images).to(device), nchw_tensor(dataset.test_images).to(device)
  train_y = torch.from_numpy(dataset.train_labels.astype(np.int64)).to(device)
  test_y = torch.from_numpy(dataset.test_labels.astype(np.int64)).to(device)
  net = net.to(device)
  opt = torch.optim.SGD(net.parameters(), lr=lr)
  loss_fn = nn.CrossEntropyLoss()
  history = []
  for epoch in range(epochs):
    t0 = time.perf_counter()
    net.train()
    loss_sum, correct, count = 0.0, 0, 0
    for idx in torch.randperm(len(train_y), device=device).split(batch_size):
      x, y = train_x[idx], train_y[idx]
      opt.zero_grad()
      logits = net(x)
      loss = loss_fn(logits, y)
      loss.backward()
      opt.step()
      with torch.no_grad():  # d2l's Accumulator: summed loss, correct predictions, examples
        loss_sum += float(loss) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    net.eval()
    with torch.no_grad():
      test_correct = sum(
        int((net(x).argmax(1) == y).sum()) for x, y in zip(test_x.split(256), test_y.split(256), strict=True)
      )
    row = {
      "epoch": epoch + 1,
      "train_loss": loss_sum / count,
      "train_acc": correct / count,
      "test_acc": test_correct / len(test_y),
      "seconds": time.perf_counter() - t0,
    }
    history.append(row)
    log(
      f"epoch {epoch + 1:2d}/{epochs}  loss {row['train_loss']:.3f}  train acc {row['train_acc']:.3f}  "
      f"test acc {row['test_acc']:.3f}  ({row['seconds']:.2f} s)"
    )
  return history


def main(argv=None):
  """`python -m experiments.torch_lenet`: the chapter's PyTorch run, the end-to-end benchmark's reference."""
  import argparse

  from experiments.lenet_fmnist import input_pipeline as data

  p = argparse.ArgumentParser(prog="python -m experiments.torch_lenet", description=main.__doc__)
  p.add_argument("--bn", choices=("nn", "scratch"), default="nn", help="nn.BatchNorm2d/1d or the chapter's own")
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--lr", type=float, default=1.0)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--allow-partial-data", action="store_true")
  p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (the data set is kept on it)")
  args = p.parse_args(argv)
  try:
    dataset = data.load_fashion_mnist(args.data_dir, expect_full=not args.allow_partial_data)
  except data.DataError as e:
    raise SystemExit(f"error: {e}") from None
  net = init_like_train_ch6((lenet_torch_bn if args.bn == "nn" else lenet_scratch_bn)(), args.seed)
  history = train_ch6(
    net, dataset, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=args.device
  )
  last = history[-1]
  ex_per_sec = len(dataset.train_labels) * len(history) / sum(h["seconds"] for h in history)
  print(f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, test acc {last['test_acc']:.3f}")
  where = f"cpu ({torch.get_num_threads()} threads)" if args.device == "cpu" else str(args.device)
  print(f"{ex_per_sec:.1f} examples/sec on {where}")
  return history


if __name__ == "__main__":
  main()
