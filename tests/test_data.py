import numpy as np
import pytest
import torch

from explorer.data import DATASETS, SHAPE_CLASSES, Dataset, load_dataset, shapes, tensors
from explorer.errors import ExplorerError


@pytest.mark.parametrize("name,shape,classes", [("digits", (1, 8, 8), 10), ("mnist1d", (1, 40), 10),
                                                  ("shapes", (3, 32, 32), 8)])
def test_builtin_datasets_shapes_and_splits(name, shape, classes):
    data = load_dataset(name)
    assert data.input_shape == shape and data.num_classes == classes
    sizes = data.sizes
    assert sizes["train"] > sizes["val"] > 0 and sizes["test"] > 0
    x, y = data.split("train")
    assert x.shape[1:] == shape and x.dtype == torch.float32 and y.dtype == torch.long
    assert set(torch.unique(data.y_train).tolist()) == set(range(classes))
    assert torch.isfinite(x).all()
    # splits are disjoint: no training image appears in the test split
    train_rows = {r.numpy().tobytes() for r in data.x_train[:300]}
    assert not any(r.numpy().tobytes() in train_rows for r in data.x_test)


def test_digits_is_the_scikit_learn_data():
    from sklearn.datasets import load_digits
    data = load_dataset("digits")
    assert sum(data.sizes.values()) == len(load_digits().target)
    counts = np.bincount(np.concatenate([data.y_train, data.y_val, data.y_test]))
    assert counts.tolist() == np.bincount(load_digits().target).tolist()


def test_splits_are_seeded_and_reproducible():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    s1, s2 = shapes(seed=3, num_samples=400), shapes(seed=3, num_samples=400)
    assert torch.equal(s1.x_train, s2.x_train)


def test_shapes_are_balanced_and_learnable_by_a_linear_probe_less_than_perfectly():
    data = shapes(seed=0, num_samples=1600)
    counts = np.bincount(np.concatenate([data.y_train, data.y_val, data.y_test]), minlength=len(SHAPE_CLASSES))
    assert counts.min() == counts.max() == 200


def test_batches_and_calibration():
    data = load_dataset("digits")
    batches = list(data.batches("train", 100))
    assert sum(len(y) for _, y in batches) == data.sizes["train"]
    calib = data.calibration(3, 32, seed=1)
    assert len(calib) == 3 and all(x.shape == (32, 1, 8, 8) for x, _ in calib)
    assert torch.equal(calib[0][0], data.calibration(1, 32, seed=1)[0][0])
    with pytest.raises(ExplorerError):
        data.calibration(0)


def test_user_tensors_pt_and_npz(tmp_path):
    x = np.random.default_rng(0).normal(size=(100, 12)).astype(np.float32)
    y = np.arange(100) % 4
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "d.pt")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    for path in (tmp_path / "d.pt", tmp_path / "d.npz"):
        data = load_dataset("tensors", path=path)
        assert data.input_shape == (1, 12) and data.num_classes == 4 and sum(data.sizes.values()) == 100


def test_user_tensors_bad_input(tmp_path):
    with pytest.raises(ExplorerError, match="needs a file"):
        load_dataset("tensors")
    np.savez(tmp_path / "nan.npz", x=np.full((30, 3), np.nan), y=np.zeros(30, dtype=int))
    with pytest.raises(ExplorerError, match="NaN"):
        tensors(tmp_path / "nan.npz")
    np.savez(tmp_path / "short.npz", x=np.zeros((30, 3)), y=np.zeros(29, dtype=int))
    with pytest.raises(ExplorerError, match="must be"):
        tensors(tmp_path / "short.npz")
    np.savez(tmp_path / "nox.npz", y=np.zeros(30, dtype=int))
    with pytest.raises(ExplorerError, match="'x'"):
        tensors(tmp_path / "nox.npz")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ExplorerError, match="Cannot read"):
        tensors(tmp_path / "junk.pt")
    with pytest.raises(ExplorerError, match="Unknown dataset"):
        load_dataset("cifar10")
    assert set(DATASETS) == {"digits", "mnist1d", "shapes", "tensors"}


def test_example_input_repeats_real_rows_when_the_test_split_is_small():
    """FLOPs and latency trace with real inputs: token ids must stay integer ids, never float zeros."""
    ids = torch.arange(20, dtype=torch.long).reshape(10, 2)
    small = Dataset(name="ids", input_shape=(2,), num_classes=2, class_names=("a", "b"),
                    x_train=ids[:7], y_train=torch.zeros(7, dtype=torch.long),
                    x_val=ids[7:8], y_val=torch.zeros(1, dtype=torch.long),
                    x_test=ids[8:], y_test=torch.zeros(2, dtype=torch.long))
    batch = small.example_input(5)
    assert batch.dtype == torch.long
    assert batch.tolist() == [[16, 17], [18, 19], [16, 17], [18, 19], [16, 17]]
    empty_test = Dataset(name="ids", input_shape=(2,), num_classes=2, class_names=("a", "b"),
                         x_train=ids[:7], y_train=torch.zeros(7, dtype=torch.long),
                         x_val=ids[7:], y_val=torch.zeros(3, dtype=torch.long),
                         x_test=ids[:0], y_test=torch.zeros(0, dtype=torch.long))
    assert empty_test.example_input(2).tolist() == [[14, 15], [16, 17]]
