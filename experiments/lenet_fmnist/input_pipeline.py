"""The chapter's input pipeline: Fashion-MNIST from the original IDX files, or tensorflow-datasets.

Where the data come from, in order (``load_fashion_mnist(source="auto")``):

1. the IDX files in ``data_dir``, else in ``$BNJAX_DATA_DIR``, else in the Debian package's
   location ``/usr/share/datasets/fashion-mnist/`` (``apt-get install dataset-fashion-mnist``).
   tensorflow-datasets cannot use those files: the package recompresses the ``.gz`` files, so
   their checksums differ from the ones tfds registers, although the content is the real data set;
2. tensorflow-datasets, when it has the data prepared (``$TFDS_DATA_DIR`` or
   ``~/tensorflow_datasets``) or, with ``source="tfds"``, can download them. It is read through
   ``tfds.data_source`` (random access, no TensorFlow needed).

When none has it, the error names every place it looked.

Everything read is validated (magic numbers, dimensions, counts, label range) before anything is
returned, so a missing, truncated or corrupted file gives one :class:`DataError` that names the file
and says how to get the data, never a half-loaded data set.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import threading
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "BNJAX_DATA_DIR"
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
ROWS = COLS = 28
NUM_CLASSES = 10
FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}
FULL_COUNTS = {"train": 60000, "test": 10000}
HOW_TO_GET = (
  "Get the original IDX files with `apt-get install dataset-fashion-mnist` (they land in "
  f"{DEBIAN_DIR}), or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
  "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (gzipped or not) in a directory and "
  f"pass it as --data-dir or ${ENV_VAR}."
)


class DataError(ValueError):
  """The data set is missing or invalid; the message names the file and the fix."""


class FashionMNIST(NamedTuple):
  """The whole data set in memory: images NHWC, float32 in [0, 1] (or raw uint8); labels int32 in 0..9."""

  train_images: np.ndarray  # [60000, 28, 28, 1]
  train_labels: np.ndarray  # [60000]
  test_images: np.ndarray  # [10000, 28, 28, 1]
  test_labels: np.ndarray  # [10000]
  source: str  # where it was read from, for logs


def _find(directory: Path, stem: str) -> Path:
  for name in (stem + ".gz", stem):
    if (directory / name).is_file():
      return directory / name
  raise DataError(f"Fashion-MNIST file {stem}(.gz) is missing in {directory}. {HOW_TO_GET}")


MAX_GZIP_MEMBERS = 64  # Fashion-MNIST's files have one; a concatenation of a few is read as gzip.open reads it


def _open(path: Path):
  return _Gunzip(path) if path.suffix == ".gz" else open(path, "rb")


class _Gunzip:
  """A ``.gz`` file read as its decompressed bytes, each ``read`` inflating at most what it asks for in one
  call of zlib (which releases Python's lock: the data load runs beside the imports; ``gzip.open`` inflates in
  small pieces, each holding it). Several gzip members are read one after the other, as ``gzip.open`` does."""

  def __init__(self, path: Path):
    self.compressed = path.read_bytes()
    self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    self.members = 1

  def read(self, size: int) -> bytes:
    parts, left = [], size
    while left > 0:
      data = self.inflate.decompress(self.inflate.unconsumed_tail or self.compressed, left)
      self.compressed = b""
      parts.append(data)
      left -= len(data)
      if self.inflate.eof:  # the end of a member: the next one, if any, starts in unused_data
        rest = self.inflate.unused_data.lstrip(b"\0")  # (gzip.open skips zero padding between members too)
        if not rest:
          break
        self.members += 1
        if self.members > MAX_GZIP_MEMBERS:  # (each member copies the rest of the file: bound the work)
          raise EOFError(f"more than {MAX_GZIP_MEMBERS} gzip members")
        self.compressed, self.inflate = rest, zlib.decompressobj(16 + zlib.MAX_WBITS)
      elif not data and not self.inflate.unconsumed_tail:
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")
    return b"".join(parts)

  def readinto(self, buffer) -> int:
    data = self.read(len(buffer))
    buffer[: len(data)] = data
    return len(data)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _unreadable(path: Path, e: Exception) -> DataError:
  return DataError(f"{path} cannot be read ({type(e).__name__}: {e}); the file is truncated or corrupted. {HOW_TO_GET}")


def read_idx(path: Path, magic: int, expected_count: int | None = None, max_count: int | None = None) -> np.ndarray:
  """Reads one IDX file (images: [N, 28, 28] uint8, labels: [N] uint8), checking it while streaming.

  The header is read and checked first (magic, dimensions, count, at most ``max_count`` examples),
  then exactly the payload it announces; a file that holds more is rejected there. A crafted
  ``.gz`` (a small file that inflates to gigabytes) is therefore never decompressed past the size a
  valid file can have.
  """
  ndim = 3 if magic == IMAGE_MAGIC else 1
  header_len = 4 * (1 + ndim)
  try:
    with _open(path) as f:
      header = f.read(header_len)
      if len(header) < header_len:
        raise DataError(
          f"{path} is {len(header)} bytes long, shorter than an IDX header ({header_len} bytes). {HOW_TO_GET}"
        )
      found_magic, *dims = struct.unpack(f">{1 + ndim}I", header)
      if found_magic != magic:
        kind = "images" if magic == IMAGE_MAGIC else "labels"
        raise DataError(f"{path} has IDX magic number {found_magic}, but {kind} files have {magic}. {HOW_TO_GET}")
      if ndim == 3 and tuple(dims[1:]) != (ROWS, COLS):
        raise DataError(f"{path} holds images of {dims[1]}x{dims[2]} pixels, but Fashion-MNIST's are 28x28.")
      if expected_count is not None and dims[0] != expected_count:
        raise DataError(
          f"{path} says it holds {dims[0]} examples, but Fashion-MNIST's file holds {expected_count} "
          "(pass --allow-partial-data, or expect_full=False, to accept a subset)."
        )
      if max_count is not None and dims[0] > max_count:
        raise DataError(f"{path} says it holds {dims[0]} examples, more than Fashion-MNIST's {max_count}.")
      size = math.prod(dims)
      payload = np.empty(size, np.uint8)
      got = f.readinto(memoryview(payload))
      extra = len(f.read(1))
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
    raise _unreadable(path, e) from e
  if got != size or extra:
    held = f"{got}" if not extra else f"more than {size}"
    raise DataError(
      f"{path} should hold {size} bytes after its header for shape {tuple(dims)}, but holds "
      f"{held}: the file is truncated or corrupted. {HOW_TO_GET}"
    )
  return payload.reshape(dims)


PIXELS = ("float32", "uint8")


def scale_pixels(images: np.ndarray, pixels: str) -> np.ndarray:
  """uint8 [N, 28, 28] -> NHWC ``[N, 28, 28, 1]``: float32 in [0, 1] (``x / 255``), or the raw uint8.

  uint8 keeps a quarter of the memory; the training step (``train.as_float_images``) scales uint8
  batches the same way on the device. The float32 division is done in place: a second 188 MB temporary
  costs more than the math.
  """
  if pixels not in PIXELS:
    raise ValueError(f"`pixels` is {pixels!r}, but should be one of {PIXELS}.")
  images = images.reshape(*images.shape, 1)
  if pixels == "uint8":
    return images
  out = images.astype(np.float32)
  out /= np.float32(255.0)
  return out


def load_idx_dir(directory: str | os.PathLike, *, expect_full: bool = True, pixels: str = "float32") -> FashionMNIST:
  """Loads and validates the four IDX files in ``directory``.

  Args:
    directory: where the files are (``.gz`` or uncompressed).
    expect_full: require the real data set's 60000/10000 examples; False accepts any count up to
      those (test fixtures, subsets) but still checks everything else.
    pixels: "float32" (in [0, 1]) or "uint8" (raw), see :func:`scale_pixels`.
  """
  if pixels not in PIXELS:
    raise ValueError(f"`pixels` is {pixels!r}, but should be one of {PIXELS}.")
  directory = Path(directory)
  if not directory.is_dir():
    raise DataError(f"Fashion-MNIST directory {directory} does not exist. {HOW_TO_GET}")
  arrays = {}
  for split in ("train", "test"):
    count = FULL_COUNTS[split] if expect_full else None
    images = read_idx(_find(directory, FILES[f"{split}_images"]), IMAGE_MAGIC, count, FULL_COUNTS[split])
    labels_path = _find(directory, FILES[f"{split}_labels"])
    labels = read_idx(labels_path, LABEL_MAGIC, count, FULL_COUNTS[split])
    if len(images) != len(labels):
      raise DataError(f"{directory}: the {split} split has {len(images)} images but {len(labels)} labels.")
    if labels.size and labels.max() >= NUM_CLASSES:
      raise DataError(f"{labels_path} holds label {int(labels.max())}, but Fashion-MNIST labels are 0..9.")
    arrays[f"{split}_images"] = scale_pixels(images, pixels)
    arrays[f"{split}_labels"] = labels.astype(np.int32)
  return FashionMNIST(**arrays, source=f"IDX files in {directory}")


def _tfds_split(source) -> tuple[np.ndarray, np.ndarray]:
  """All ``(images [N, 28, 28] uint8, labels [N] int32)`` of a tfds random-access data source."""
  n = len(source)
  images, labels = np.empty((n, ROWS, COLS), np.uint8), np.empty((n,), np.int32)
  for i in range(n):  # element by element: tfds' mocked sources have no batched __getitems__
    record = source[i]
    images[i] = np.asarray(record["image"], np.uint8).reshape(ROWS, COLS)
    labels[i] = int(record["label"])
  if n and labels.max() >= NUM_CLASSES:
    raise DataError(f"tensorflow-datasets' fashion_mnist holds label {int(labels.max())}, but labels are 0..9.")
  return images, labels


# Where tensorflow-datasets downloads fashion_mnist from (its builder's URL).
TFDS_HOST = "fashion-mnist.s3-website.eu-central-1.amazonaws.com"


def check_resolves(host: str, timeout_s: float = 10.0) -> None:
  """DataError within ``timeout_s`` seconds when ``host``'s name does not resolve (offline, no DNS).

  tensorflow-datasets retries a failed download for minutes before it gives up; a name that does not
  resolve is known at once.
  """
  failed: list[str] = []

  def resolve():
    try:
      socket.getaddrinfo(host, 80)
    except OSError as e:
      failed.append(e.strerror or str(e))

  thread = threading.Thread(target=resolve, daemon=True, name="bnjax-resolve")
  thread.start()
  thread.join(timeout_s)
  if failed or thread.is_alive():
    reason = failed[0] if failed else f"no answer within {timeout_s:.0f} s"
    raise DataError(
      f"tensorflow-datasets would download fashion_mnist from {host}, but that name does not resolve here "
      f'({reason}): no network or no name resolution. Check it with python -c "import socket; '
      f"socket.getaddrinfo('{host}', 80)\", or use the IDX files instead. {HOW_TO_GET}"
    )


def load_tfds(data_dir: str | None = None, download: bool = False, pixels: str = "float32") -> FashionMNIST:
  """Loads Fashion-MNIST through tensorflow-datasets' random-access ``tfds.data_source`` (no TensorFlow needed).

  ``data_dir`` is a TFDS data directory (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``);
  ``download=True`` lets tfds download and prepare the data set there first.
  """
  if pixels not in PIXELS:
    raise ValueError(f"`pixels` is {pixels!r}, but should be one of {PIXELS}.")
  if download and not _tfds_prepared(data_dir):
    check_resolves(TFDS_HOST)
  try:
    import tensorflow_datasets as tfds

    splits = tfds.data_source("fashion_mnist", split=["train", "test"], data_dir=data_dir, download=download)
    (train_x, train_y), (test_x, test_y) = (_tfds_split(s) for s in splits)
  except DataError:
    raise
  except Exception as e:  # tfds raises many types: not installed, data not prepared, failed download
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise DataError(
      f"tensorflow-datasets could not load fashion_mnist ({type(e).__name__}: {first}). {HOW_TO_GET}"
    ) from e
  return FashionMNIST(
    train_images=scale_pixels(train_x, pixels),
    train_labels=train_y,
    test_images=scale_pixels(test_x, pixels),
    test_labels=test_y,
    source="tensorflow-datasets",
  )


def _tfds_prepared(data_dir: str | None) -> bool:
  root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")
  return any((root / "fashion_mnist").glob("*/dataset_info.json"))


SOURCES = ("auto", "idx", "tfds")


def load_fashion_mnist(
  data_dir: str | os.PathLike | None = None, *, source: str = "auto", expect_full: bool = True, pixels: str = "float32"
) -> FashionMNIST:
  """Loads Fashion-MNIST from the first place that has it (see the module docstring).

  Args:
    data_dir: a directory of IDX files (``source`` "auto"/"idx") or a TFDS data_dir ("tfds").
    source: "auto", "idx" or "tfds" ("tfds" downloads the data set when it is not prepared).
    expect_full: with IDX files, require the full 60000/10000 examples.
    pixels: "float32" (in [0, 1]) or "uint8" (raw, a quarter of the memory), see :func:`scale_pixels`.
  """
  if source not in SOURCES:
    raise ValueError(f"`source` is {source!r}, but should be one of {SOURCES}.")
  if source == "tfds":
    return load_tfds(None if data_dir is None else str(data_dir), download=True, pixels=pixels)
  directory = data_dir or os.environ.get(ENV_VAR)
  if directory is not None or source == "idx":
    return load_idx_dir(directory or DEBIAN_DIR, expect_full=expect_full, pixels=pixels)
  if (DEBIAN_DIR / (FILES["train_images"] + ".gz")).is_file():
    return load_idx_dir(DEBIAN_DIR, expect_full=expect_full, pixels=pixels)
  if _tfds_prepared(None):
    return load_tfds(pixels=pixels)
  raise DataError(
    f"Fashion-MNIST was found nowhere: no data directory was given (--data-dir, ${ENV_VAR}), the Debian "
    f"package's IDX files are not in {DEBIAN_DIR}, and tensorflow-datasets has not prepared fashion_mnist "
    "(in $TFDS_DATA_DIR or ~/tensorflow_datasets). " + HOW_TO_GET + " Or let tensorflow-datasets download it "
    "(--data-source tfds; needs the network)."
  )
