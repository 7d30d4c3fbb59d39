"""Datasets, batching and augmentation, on real tensors and the real MNIST archives."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sweep.archives import official_train_set
from sweep.config import ConfigError
from sweep.data import (
    augment_batch,
    cifar10,
    digits,
    load_data,
    make_regression,
    mnist,
    synthetic_classification,
    synthetic_images,
    synthetic_regression,
    tensor_batches,
)
from sweep.models import build_model
from sweep.validation import DataError

CONF = Path(__file__).parents[1] / "conf"
ARCHIVES = Path(__file__).parents[2] / "shared" / "data"  # ../shared/data from the repo root
needs_archives = pytest.mark.skipif(not ARCHIVES.is_dir(), reason=f"no archives in {ARCHIVES}")
MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def dataset_cfg(name, seed=0, **overrides):
    """conf/dataset/<name>.yaml as the CLI composes it: `${seed}` resolves to the top-level seed."""
    dataset = OmegaConf.merge(OmegaConf.load(CONF / "dataset" / f"{name}.yaml"), overrides)
    return OmegaConf.create({"seed": seed, "dataset": dataset}).dataset


def tensorGenReg(num_examples=1000, w=(2, -1, 1), bias=True, delta=0.01, deg=1):  # noqa: N802
    """The BN article's generator, verbatim apart from formatting (it draws from the global RNG)."""
    if bias:
        num_inputs = len(w) - 1
        features_true = torch.randn(num_examples, num_inputs)
        w_true = torch.tensor(w[:-1]).reshape(-1, 1).float()
        b_true = torch.tensor(w[-1]).float()
        if num_inputs == 1:
            labels_true = torch.pow(features_true, deg) * w_true + b_true
        else:
            labels_true = torch.mm(torch.pow(features_true, deg), w_true) + b_true
        features = torch.cat((features_true, torch.ones(len(features_true), 1)), 1)
        labels = labels_true + torch.randn(size=labels_true.shape) * delta
    else:
        num_inputs = len(w)
        features = torch.randn(num_examples, num_inputs)
        w_true = torch.tensor(w).reshape(-1, 1).float()
        if num_inputs == 1:
            labels_true = torch.pow(features, deg) * w_true
        else:
            labels_true = torch.mm(torch.pow(features, deg), w_true)
        labels = labels_true + torch.randn(size=labels_true.shape) * delta
    return features, labels


def sorted_rows(x, y):
    order = x[:, 0].argsort()
    return x[order], y[order]


# --- synthetic data ------------------------------------------------------------------------------

@pytest.mark.parametrize("w, bias, deg", [((2, -1, 3, 1, 2), False, 2), ((2, -1, 1), True, 1),
                                          ((3,), False, 3)])
def test_make_regression_is_the_articles_tensorGenReg(w, bias, deg):
    with torch.random.fork_rng():
        torch.manual_seed(42)
        features, labels = tensorGenReg(500, w=w, bias=bias, deg=deg)
    x, y = make_regression(500, w, deg, bias, 0.01, torch.Generator().manual_seed(42))
    assert torch.equal(x, features) and torch.equal(y, labels)


def test_synthetic_regression_splits_the_articles_data():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        features, labels = tensorGenReg(w=[2, -1, 3, 1, 2], bias=False, deg=2)
    data = load_data(dataset_cfg("synthetic_regression", seed=3))

    assert (len(data.x_train), len(data.x_val)) == (700, 300)  # the article's 70/30 split
    assert data.task == "regression" and data.in_shape == (5,) and data.num_outputs == 1
    assert data.y_train.shape == (700, 1) and data.x_train.dtype == torch.float32
    x, y = sorted_rows(torch.cat([data.x_train, data.x_val]), torch.cat([data.y_train, data.y_val]))
    assert torch.equal(x, sorted_rows(features, labels)[0])
    assert torch.equal(y, sorted_rows(features, labels)[1])


@pytest.mark.parametrize("make", [synthetic_regression, synthetic_classification, digits,
                                  synthetic_images])
def test_data_and_split_are_reproducible_by_seed_and_differ_across_seeds(make):
    a, b, c = make(seed=0), make(seed=0), make(seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_train, c.x_train)


def test_synthetic_classification_is_balanced_gaussian_blobs():
    data = synthetic_classification(n_samples=900, n_classes=3, class_sep=4.0, std=0.5)
    x, y = torch.cat([data.x_train, data.x_val]), torch.cat([data.y_train, data.y_val])
    assert data.task == "classification" and y.dtype == torch.int64 and data.num_outputs == 3
    assert torch.bincount(y).tolist() == [300, 300, 300]
    centres = torch.stack([x[y == k].mean(0) for k in range(3)])
    assert torch.allclose(centres, torch.tensor([[-4.0], [0.0], [4.0]]).expand(3, 2), atol=0.1)


def test_synthetic_images_are_class_patterns_under_noise():
    data = synthetic_images(n_samples=200, shape=[1, 8, 8], n_classes=4, signal=2.0)
    assert data.in_shape == (1, 8, 8) and data.x_train.shape == (160, 1, 8, 8)
    assert data.task == "classification" and data.num_outputs == 4
    # Each class's mean image is its pattern: far closer to its own class's images than to others'.
    x, y = data.x_train, data.y_train
    means = torch.stack([x[y == k].mean(0) for k in range(4)])
    nearest = ((data.x_val[:, None] - means[None]) ** 2).flatten(2).sum(2).argmin(1)
    assert (nearest == data.y_val).float().mean() > 0.9


def test_digits_are_normalised_on_the_train_split():
    data = digits(val_fraction=0.2, seed=0)
    assert data.x_train.shape == (1438, 1, 8, 8) and data.x_val.shape == (359, 1, 8, 8)
    assert data.in_shape == (1, 8, 8) and data.num_outputs == 10 and data.name == "digits"
    assert abs(data.x_train.mean()) < 1e-5 and abs(data.x_train.std() - 1) < 1e-5
    assert abs(data.x_val.mean()) > 1e-4  # val statistics were not used
    assert set(data.y_train.tolist()) == set(range(10))
    assert digits(flatten=True).x_train.shape == (1438, 64)


def test_data_reports_its_size_and_steps():
    data = digits()
    assert data.nbytes == (1438 + 359) * 64 * 4 + (1438 + 359) * 8
    assert data.steps_per_epoch(100) == 15  # 1438 samples: 14 full batches and one of 38


# --- validation at the edge ----------------------------------------------------------------------

@pytest.mark.parametrize("make, kwargs, key", [
    (synthetic_regression, {"val_fraction": 1.0}, "dataset.val_fraction"),
    (synthetic_regression, {"val_fraction": 0}, "dataset.val_fraction"),
    (synthetic_regression, {"n_samples": 1}, "dataset.n_samples"),
    (synthetic_regression, {"degree": 0}, "dataset.degree"),
    (synthetic_regression, {"weights": [], "bias": False}, "dataset.weights"),
    (synthetic_classification, {"n_classes": 1}, "dataset.n_classes"),
    (synthetic_images, {"shape": [32, 32]}, "dataset.shape"),
    (synthetic_images, {"signal": -1}, "dataset.signal"),
    (digits, {"augment": {"crop_padding": -1}}, "dataset.augment.crop_padding"),
    (digits, {"augment": {"crop_padding": 1}, "flatten": True}, "dataset.augment"),
    (mnist, {"train_size": 0}, "dataset.train_size"),
])
def test_bad_arguments_name_the_key_and_what_is_allowed(make, kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}=.*not allowed: "):
        make(**kwargs)


def test_load_data_rejects_unknown_keys_and_surfaces_config_errors():
    with pytest.raises(ConfigError, match=r"dataset.val_fractoin=0.5 .*takes only val_fraction"):
        load_data(dataset_cfg("digits", val_fractoin=0.5))
    with pytest.raises(ConfigError, match=r"dataset.val_fraction=1.5"):
        load_data(dataset_cfg("digits", val_fraction=1.5))


# --- batching and augmentation -------------------------------------------------------------------

def test_tensor_batches_cover_every_sample_once_per_epoch():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    g = torch.Generator().manual_seed(0)
    batches = list(tensor_batches(x, y, 4, shuffle=True, generator=g))

    assert [len(yb) for _, yb in batches] == [4, 4, 2]  # the last partial batch is kept
    seen = torch.cat([yb for _, yb in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(xb.view(-1), yb.float()) for xb, yb in batches)  # pairs stay paired
    again = tensor_batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([yb for _, yb in again]), seen)
    in_order = tensor_batches(x, y, 4, shuffle=False)
    assert torch.cat([yb for _, yb in in_order]).tolist() == list(range(10))


def test_augment_batch_flips_about_half_the_samples():
    x = torch.randn(64, 3, 5, 5)
    out = augment_batch(x, crop_padding=0, hflip=True, generator=torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, s.flip(-1)) for o, s in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, s) for o, s in zip(out, x, strict=True)])
    assert out.shape == x.shape and bool((flipped ^ kept).all())
    assert 16 < flipped.sum() < 48


def test_augment_batch_crops_windows_of_the_zero_padded_image():
    x = torch.randn(32, 2, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, crop_padding=2, hflip=False, generator=g)
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 6])]
        assert windows, f"sample {i} is not a crop of its padded image"
        offsets.add(windows[0])
    assert out.shape == x.shape and len(offsets) > 5  # offsets vary per sample
    same = augment_batch(x, crop_padding=2, hflip=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, same)
    assert augment_batch(x, crop_padding=0, hflip=False) is x


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_and_augmentation_match_the_cpu():
    x, y = torch.randn(50, 3, 8, 8), torch.arange(50)

    def epoch(device):
        g = torch.Generator().manual_seed(0)  # the CPU generator drives both devices
        batches = tensor_batches(x.to(device), y.to(device), 16, shuffle=True, generator=g)
        return [(augment_batch(xb, 2, True, g).cpu(), yb.cpu()) for xb, yb in batches]

    for (xc, yc), (xg, yg) in zip(epoch("cpu"), epoch("cuda"), strict=True):
        assert torch.equal(yc, yg) and torch.equal(xc, xg)


# --- torchvision datasets offline ----------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """Our own data dir, filled from the read-only archives the first time MNIST loads."""
    return tmp_path_factory.mktemp("data")


@needs_archives
def test_mnist_extracts_verified_archives_and_loads(mnist_root):
    data = load_data(dataset_cfg("mnist", root=str(mnist_root), archives=str(ARCHIVES)))

    assert len(data.x_train) + len(data.x_val) == 60000 and len(data.x_val) == 6000
    assert data.x_train.shape[1:] == (1, 28, 28) and data.in_shape == (1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.num_outputs == 10
    pixels = torch.cat([data.x_train, data.x_val]) * 0.3081 + 0.1307  # undo the normalisation
    assert pixels.mean(dtype=torch.float64).item() == pytest.approx(0.1307, abs=1e-4)
    extracted = {path.name for path in (mnist_root / "MNIST" / "raw").iterdir()}
    assert extracted == {name.removesuffix(".gz") for name in MNIST_FILES}

    images, labels = official_train_set("MNIST", mnist_root)  # now without archives: extracted
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


@needs_archives
def test_fashion_mnist_first_labels(tmp_path):
    images, labels = official_train_set("FashionMNIST", tmp_path, archives=ARCHIVES)
    assert images.shape == (60000, 1, 28, 28)
    assert labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


@needs_archives
def test_train_size_keeps_the_first_shuffled_samples(mnist_root):
    small = mnist(root=mnist_root, archives=ARCHIVES, train_size=100, seed=0)
    full = mnist(root=mnist_root, archives=ARCHIVES, seed=0)
    assert len(small.x_train) == 100 and len(small.x_val) == 6000
    assert torch.equal(small.x_train, full.x_train[:100])


@needs_archives
def test_a_corrupt_archive_fails_with_its_md5(tmp_path):
    raw = tmp_path / "archives" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES[1:]:
        (raw / name).symlink_to(ARCHIVES / "MNIST" / "raw" / name)
    broken = bytearray((ARCHIVES / "MNIST" / "raw" / MNIST_FILES[0]).read_bytes())
    broken[1000] ^= 0xFF
    (raw / MNIST_FILES[0]).write_bytes(broken)

    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: md5 .* corrupt"):
        mnist(root=tmp_path / "data", archives=tmp_path / "archives")


def test_missing_files_offline_name_the_folders_and_files(tmp_path):
    with pytest.raises(DataError) as error:
        mnist(root=tmp_path / "data", archives=tmp_path / "elsewhere")
    message = str(error.value)
    assert str(tmp_path / "data") in message and str(tmp_path / "elsewhere") in message
    assert all(name in message for name in MNIST_FILES)
    assert "dataset.download=true" in message and "dataset.archives=" in message


def test_cifar10_offline_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR10 .*cifar-10-python.tar.gz.*dataset.download=true"):
        cifar10(root=tmp_path)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the real tarball")
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz: md5"):
        cifar10(root=tmp_path)


# --- every dataset feeds a model -----------------------------------------------------------------

@pytest.mark.parametrize("dataset, overrides, model", [
    ("synthetic_regression", {}, "mlp"),
    ("synthetic_classification", {}, "mlp"),
    ("digits", {}, "cnn"),
    ("digits", {"flatten": True}, "mlp"),
    pytest.param("mnist", {"train_size": 64, "archives": str(ARCHIVES)}, "cnn",
                 marks=needs_archives),
    pytest.param("mnist", {"train_size": 64, "archives": str(ARCHIVES)}, "mlp",
                 marks=needs_archives),
])
def test_build_model_fits_each_dataset(dataset, overrides, model, mnist_root):
    if dataset == "mnist":
        overrides = {**overrides, "root": str(mnist_root)}
    data = load_data(dataset_cfg(dataset, **overrides))
    net = build_model(OmegaConf.load(CONF / "model" / f"{model}.yaml"), data)
    out = net(data.x_train[:16])
    assert out.shape == (16, data.num_outputs)
    if data.task == "regression":
        assert out.shape == data.y_train[:16].shape  # MSE against y needs no reshaping
