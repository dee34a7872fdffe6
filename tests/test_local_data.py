"""A SuperNode's own data (node config ``data-path``): formats, normalisation, splits, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from fedtl.config import make_config
from fedtl.data.datasets import DIGITS, MNIST
from fedtl.data.local import LocalDataError, client_stats, local_client_data, read_local

DIGITS_CFG = make_config({"dataset": "digits"})


@pytest.fixture(scope="module")
def digits():
    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_of_raw_digits_is_normalised_exactly_as_in_simulation(tmp_path, digits):
    x, y = digits
    path = _npz(tmp_path / "site.npz", x=x[:300], y=y[:300])
    local = read_local(path, DIGITS)
    simulated = DIGITS.load(DIGITS_CFG).train
    idx = torch.arange(300)
    assert torch.equal(local.labels(idx), simulated.labels(idx))
    assert torch.allclose(local.inputs(idx), simulated.inputs(idx))


def test_channel_last_and_channel_first_images_give_the_same_samples(tmp_path, digits):
    x, y = digits
    a = read_local(_npz(tmp_path / "a.npz", x=x[:50], y=y[:50]), DIGITS)
    b = read_local(_npz(tmp_path / "b.npz", x=x[:50, :, :, None], y=y[:50]), DIGITS)
    c = read_local(_npz(tmp_path / "c.npz", x=x[:50, None], y=y[:50]), DIGITS)
    assert torch.equal(a.inputs(), b.inputs()) and torch.equal(a.inputs(), c.inputs())
    floats = read_local(_npz(tmp_path / "f.npz", x=x[:50] / 16.0, y=y[:50]), DIGITS)
    assert torch.allclose(floats.inputs(), a.inputs(), atol=1e-6)


def test_splits_are_deterministic_from_the_seed_and_cover_the_data(tmp_path, digits):
    x, y = digits
    path = _npz(tmp_path / "site.npz", x=x[:200], y=y[:200])
    one = local_client_data(path, DIGITS_CFG)
    again = local_client_data(path, make_config({"dataset": "digits", "lr": 0.1}))
    other = local_client_data(path, make_config({"dataset": "digits", "seed": 1}))
    assert (len(one.train), len(one.val), len(one.test)) == (120, 30, 50)
    assert torch.equal(one.test.y, again.test.y) and torch.equal(one.train.x, again.train.x)
    assert not torch.equal(one.train.x, other.train.x)
    stats = client_stats(one, 10)
    assert stats["partition-id"] == -1 and sum(stats["label-counts"]) == 200
    assert stats["label-counts"] == np.bincount(y[:200], minlength=10).tolist()


def test_feature_vectors_are_used_as_they_are(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 60)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    cfg = make_config({"dataset": "synthetic", "partitioner": "natural", "model": "mlr"})
    data = local_client_data(_npz(tmp_path / "s.npz", x=x, y=y), cfg)
    pooled = torch.cat([data.train.x, data.val.x, data.test.x])
    assert sorted(pooled[:, 0].tolist()) == sorted(x[:, 0].tolist())


def test_image_folder_with_integer_class_folders(tmp_path, digits):
    x, y = digits
    for i in range(30):
        folder = tmp_path / "images" / str(y[i])
        folder.mkdir(parents=True, exist_ok=True)
        # 16x16 PNGs of 8-bit values: resized to the dataset's 8x8, scaled by 1/255
        Image.fromarray((x[i] * 15).astype(np.uint8)).resize((16, 16)).save(folder / f"{i}.png")
    data = read_local(tmp_path / "images", DIGITS)
    assert data.x.shape == (30, 1, 8, 8) and data.x.dtype == torch.uint8
    assert sorted(data.y.tolist()) == sorted(y[:30].tolist())
    (tmp_path / "images" / "cat").mkdir()
    with pytest.raises(LocalDataError, match="class folder 'cat' is not a label"):
        read_local(tmp_path / "images", DIGITS)


def _idx(path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_folder_in_torchvision_layout_gives_its_train_files_never_the_central_test_set(
        tmp_path):
    raw = tmp_path / "site" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 8)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), 2049)
    data = read_local(tmp_path / "site", MNIST)
    assert data.x.shape == (12, 1, 28, 28) and data.scale == pytest.approx(1 / 255)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(LocalDataError, match="MNIST/raw"):
        read_local(tmp_path / "site", MNIST)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((5, 8, 8), np.uint8)}, "needs arrays 'x' .* and 'y'"),
    ({"x": np.zeros((5, 28, 28), np.uint8), "y": np.zeros(5, int)}, r"shape \(5, 28, 28\)"),
    ({"x": np.zeros((5, 8, 8), np.uint8), "y": np.array([0, 1, 2, 3, 10])},
     r"label 10 is outside 0..9"),
    ({"x": np.zeros((5, 8, 8), np.uint8), "y": np.zeros(4, int)}, "one label per sample"),
    ({"x": np.full((5, 8, 8), 200, np.uint8), "y": np.zeros(5, int)}, "raw values 0..16"),
    ({"x": np.full((5, 8, 8), 3.0), "y": np.zeros(5, int)}, r"lie in \[0, 1\]"),
    ({"x": np.zeros((0, 8, 8), np.uint8), "y": np.zeros(0, int)}, "holds no samples"),
])
def test_malformed_npz_names_the_problem(tmp_path, arrays, message):
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(LocalDataError, match=message) as info:
        read_local(path, DIGITS)
    assert str(info.value).startswith(f"data-path '{path}'")


def test_missing_unreadable_and_unsupported_paths(tmp_path):
    with pytest.raises(LocalDataError, match="does not exist on this SuperNode"):
        read_local(tmp_path / "nowhere.npz", DIGITS)
    (tmp_path / "broken.npz").write_bytes(b"not a zip file")
    with pytest.raises(LocalDataError, match="cannot be read as an .npz"):
        read_local(tmp_path / "broken.npz", DIGITS)
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(LocalDataError, match="not an .npz"):
        read_local(tmp_path / "data.csv", DIGITS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LocalDataError, match="no class subfolders"):
        read_local(tmp_path / "empty", MNIST)


def test_too_few_samples_to_train_on(tmp_path, digits):
    x, y = digits
    path = _npz(tmp_path / "tiny.npz", x=x[:2], y=y[:2])
    with pytest.raises(LocalDataError, match="2 samples are too few"):
        local_client_data(path, DIGITS_CFG)


def test_check_data_command(tmp_path, digits, capsys):
    from fedtl.cli import main

    x, y = digits
    path = _npz(tmp_path / "site.npz", x=x[:100], y=y[:100])
    assert main(["deploy", "check-data", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["num-train"] == 60
    assert main(["deploy", "check-data", str(path), "--set", "dataset=mnist"]) == 2
    assert "needs images of shape" in capsys.readouterr().err


def test_a_site_without_partition_id_draws_its_labelled_subset(tmp_path):
    path = tmp_path / "site.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 17, (40, 8, 8)).astype(np.uint8),
             y=rng.integers(0, 10, 40))
    data = local_client_data(path, make_config({"dataset": "digits"}))  # partition id -1
    labelled = data.labelled(0.25, seed=0)
    assert len(labelled) == round(0.25 * len(data.train))
