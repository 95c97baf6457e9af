"""Fashion-MNIST loading: IDX parsing, validation with clear errors, and the real data set."""

import gzip
import re

import numpy as np
import pytest

from experiments.lenet_fmnist import input_pipeline as data
from tests.experiments.helpers import make_fmnist_dir, write_idx


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_loads_small_idx_files_as_float_nhwc_and_int_labels(tmp_path, compress):
  d = make_fmnist_dir(tmp_path, n_train=40, n_test=12, compress=compress)
  ds = data.load_idx_dir(d, expect_full=False)
  assert ds.train_images.shape == (40, 28, 28, 1) and ds.test_images.shape == (12, 28, 28, 1)
  assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
  assert 0.0 <= ds.train_images.min() and ds.train_images.max() == 1.0
  raw = np.frombuffer(
    gzip.open(d / (data.FILES["train_images"] + ".gz")).read()[16:]
    if compress
    else (d / data.FILES["train_images"]).read_bytes()[16:],
    np.uint8,
  )
  np.testing.assert_allclose(ds.train_images.reshape(-1), raw / 255.0, rtol=1e-6)


def test_full_counts_are_required_by_default(fmnist_dir):
  with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.gz says it holds 512 examples.*60000"):
    data.load_idx_dir(fmnist_dir)


def test_missing_file_names_it_and_says_how_to_get_the_data(fmnist_dir):
  (fmnist_dir / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte\(\.gz\) is missing.*apt-get install"):
    data.load_idx_dir(fmnist_dir, expect_full=False)


def test_missing_directory(tmp_path):
  with pytest.raises(data.DataError, match=r"does not exist.*dataset-fashion-mnist"):
    data.load_idx_dir(tmp_path / "nope")


def test_truncated_file_is_reported_not_half_loaded(fmnist_dir):
  path = fmnist_dir / "train-images-idx3-ubyte.gz"
  payload = gzip.open(path).read()
  with gzip.open(path, "wb") as f:
    f.write(payload[:-100])
  with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.gz should hold .* truncated or corrupted"):
    data.load_idx_dir(fmnist_dir, expect_full=False)


def test_truncated_gzip_stream(fmnist_dir):
  path = fmnist_dir / "train-labels-idx1-ubyte.gz"
  path.write_bytes(path.read_bytes()[:30])
  with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte.gz cannot be read.*truncated or corrupted"):
    data.load_idx_dir(fmnist_dir, expect_full=False)


def test_not_gzip_at_all(fmnist_dir):
  (fmnist_dir / "train-labels-idx1-ubyte.gz").write_bytes(b"<html>not found</html>")
  with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte.gz cannot be read"):
    data.load_idx_dir(fmnist_dir, expect_full=False)


def test_wrong_magic_number(fmnist_dir):
  write_idx(fmnist_dir / "t10k-images-idx3-ubyte", np.zeros((128, 28, 28)), 2049)
  with pytest.raises(data.DataError, match=r"magic number 2049, but images files have 2051"):
    data.load_idx_dir(fmnist_dir, expect_full=False)


def test_label_out_of_range(fmnist_dir):
  write_idx(fmnist_dir / "train-labels-idx1-ubyte", np.full(512, 10), data.LABEL_MAGIC)
  with pytest.raises(data.DataError, match=r"holds label 10, but Fashion-MNIST labels are 0..9"):
    data.load_idx_dir(fmnist_dir, expect_full=False)


def test_image_and_label_counts_must_agree(fmnist_dir):
  write_idx(fmnist_dir / "train-labels-idx1-ubyte", np.zeros(500), data.LABEL_MAGIC)
  with pytest.raises(data.DataError, match=r"512 images but 500 labels"):
    data.load_idx_dir(fmnist_dir, expect_full=False)


def test_environment_variable_points_at_the_directory(fmnist_dir, monkeypatch):
  monkeypatch.setenv(data.ENV_VAR, str(fmnist_dir))
  assert len(data.load_fashion_mnist(expect_full=False).train_labels) == 512


def test_bad_source_is_rejected():
  with pytest.raises(ValueError, match=r"`source` is 'web'"):
    data.load_fashion_mnist(source="web")


@pytest.mark.slow
def test_the_real_data_set_from_the_debian_package():
  """CI installs dataset-fashion-mnist (.ci/setup); a missing package fails here, it does not skip.

  ``$BNJAX_DATA_DIR``, when set, names another copy of the same files (e.g. on a GPU machine).
  """
  ds = data.load_fashion_mnist(source="idx")
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert np.bincount(ds.train_labels).tolist() == [6000] * 10
  assert np.bincount(ds.test_labels).tolist() == [1000] * 10
  assert 0.25 < ds.train_images.mean() < 0.35  # Fashion-MNIST's mean pixel is about 0.286


def test_a_gzip_bomb_is_rejected_after_the_header_without_inflating_it(tmp_path, fmnist_dir):
  import tracemalloc

  # A valid header for 512 images followed by ~400 MB of zeros, compressed to well under 1 MB.
  path = fmnist_dir / "train-images-idx3-ubyte.gz"
  with gzip.open(path, "wb", compresslevel=9) as f:
    f.write(np.array([data.IMAGE_MAGIC, 512, 28, 28], ">u4").tobytes())
    zeros = bytes(1 << 24)
    for _ in range(25):
      f.write(zeros)
  assert path.stat().st_size < 1_000_000
  tracemalloc.start()
  with pytest.raises(data.DataError, match=r"should hold 401408 bytes .* but holds more than 401408"):
    data.load_idx_dir(fmnist_dir, expect_full=False)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 50_000_000, f"allocated {peak / 1e6:.0f} MB before rejecting the file"


def test_a_header_announcing_more_than_the_real_data_set_is_rejected(fmnist_dir):
  path = fmnist_dir / "t10k-labels-idx1-ubyte.gz"
  with gzip.open(path, "wb") as f:
    f.write(np.array([data.LABEL_MAGIC, 4_000_000_000], ">u4").tobytes())
  with pytest.raises(data.DataError, match=r"says it holds 4000000000 examples, more than Fashion-MNIST's 10000"):
    data.load_idx_dir(fmnist_dir, expect_full=False)


def test_partial_data_message_names_the_flag(fmnist_dir):
  with pytest.raises(data.DataError, match=r"holds 512 examples.*--allow-partial-data"):
    data.load_idx_dir(fmnist_dir)


def test_uint8_pixels_are_the_raw_bytes_of_the_float_ones(fmnist_dir):
  floats = data.load_idx_dir(fmnist_dir, expect_full=False)
  raw = data.load_idx_dir(fmnist_dir, expect_full=False, pixels="uint8")
  assert raw.train_images.dtype == np.uint8 and raw.train_images.shape == floats.train_images.shape
  np.testing.assert_array_equal(raw.train_images.astype(np.float32) / np.float32(255), floats.train_images)
  with pytest.raises(ValueError, match=r"`pixels` is 'float64'"):
    data.load_idx_dir(fmnist_dir, pixels="float64")


def test_the_tfds_source_reads_through_data_source_without_tensorflow(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # the [experiments] extra installs it: a broken install fails here

  # mock_data downloads nothing, so it needs no network; the check for one is the next test's subject.
  monkeypatch.setattr(data, "check_resolves", lambda host: None)
  with tfds.testing.mock_data(num_examples=7):
    ds = data.load_fashion_mnist(str(tmp_path), source="tfds", pixels="uint8")
  assert ds.source == "tensorflow-datasets"
  assert ds.train_images.shape == (7, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_labels.shape == (7,) and ds.test_labels.dtype == np.int32
  assert ds.train_labels.min() >= 0 and ds.train_labels.max() <= 9


def test_auto_without_any_source_names_every_place_it_looked(monkeypatch, tmp_path):
  monkeypatch.delenv(data.ENV_VAR, raising=False)
  monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "nowhere")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  with pytest.raises(data.DataError) as e:
    data.load_fashion_mnist()
  message = str(e.value)
  for place in ("--data-dir", data.ENV_VAR, str(tmp_path / "nowhere"), "tensorflow-datasets", "--data-source tfds"):
    assert place in message, (place, message)


def test_tfds_offline_fails_at_once_naming_the_host_and_what_to_do(monkeypatch, tmp_path):
  import socket

  import tensorflow_datasets as tfds

  assert f"//{data.TFDS_HOST}/" in tfds.builder_cls("fashion_mnist").URL  # the host tfds downloads from

  def no_name_resolution(host, *args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

  monkeypatch.setattr(socket, "getaddrinfo", no_name_resolution)
  with pytest.raises(data.DataError) as e:  # (not after tfds' retries: it is never asked to download)
    data.load_fashion_mnist(tmp_path / "tfds", source="tfds")
  message = str(e.value)
  assert re.search(r"fashion-mnist\.s3-website\S*, but that name does not resolve here \(Name or service not", message)
  assert "socket.getaddrinfo" in message and "--data-dir" in message and "apt-get install" in message


def test_a_gz_file_of_several_members_reads_as_gzip_reads_it(fmnist_dir):
  # (gzip allows concatenated members, e.g. `cat a.gz b.gz`; the whole-buffer reader goes from one to the next)
  path = fmnist_dir / "train-images-idx3-ubyte.gz"
  payload = gzip.open(path).read()
  path.write_bytes(gzip.compress(payload[:1000]) + gzip.compress(payload[1000:5000]) + gzip.compress(payload[5000:]))
  assert gzip.open(path).read() == payload
  images = data.read_idx(path, data.IMAGE_MAGIC)
  np.testing.assert_array_equal(images.reshape(-1), np.frombuffer(payload[16:], np.uint8))


def test_a_gz_file_of_very_many_members_is_refused(fmnist_dir):
  path = fmnist_dir / "train-labels-idx1-ubyte.gz"
  payload = gzip.open(path).read()
  path.write_bytes(b"".join(gzip.compress(payload[i : i + 8]) for i in range(0, len(payload), 8)))
  assert len(payload) // 8 > data.MAX_GZIP_MEMBERS
  with pytest.raises(data.DataError, match=r"cannot be read \(EOFError: more than 64 gzip members\)"):
    data.load_idx_dir(fmnist_dir, expect_full=False)
