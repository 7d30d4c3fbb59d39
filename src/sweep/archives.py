"""Torchvision datasets offline: the official archives found under `dataset.root` or
`dataset.archives`, checked against torchvision's md5s and extracted into a root we can write (a
user with the archives and no internet is exactly the case torchvision's `download=False` leaves
out), else downloaded when `dataset.download=true`. Every failure is a DataError naming the
setting to change."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sweep.validation import DataError


def _archives(cls: type) -> list[tuple[str, str]]:
    """(path under a torchvision root, md5) of each archive a torchvision dataset class needs."""
    if hasattr(cls, "resources"):  # MNIST family: one .gz per file, under <ClassName>/raw/
        return [(f"{cls.__name__}/raw/{name}", md5) for name, md5 in cls.resources]
    return [(cls.filename, cls.tgz_md5)]  # CIFAR: one tarball at the root


def _check_md5(path: Path, expected: str, where: str = "") -> None:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise DataError(f"{where}{path}: md5 {digest.hexdigest()} is not torchvision's "
                        f"{expected} for {path.name}; the archive is corrupt or truncated: "
                        "replace it")


def _extract(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if archive.name.endswith(".tar.gz"):
        from torchvision.datasets.utils import extract_archive

        extract_archive(archive, dest)
        return
    out = dest / archive.name.removesuffix(".gz")
    part = out.with_name(out.name + ".part")  # rename at the end: no half-written file on a crash
    with gzip.open(archive) as src, open(part, "wb") as dst:
        shutil.copyfileobj(src, dst)
    part.replace(out)


def _keys(root: str | Path, archives: str | Path | None) -> str:
    """`dataset.root='data'` (and `dataset.archives=...`): the settings named in a message."""
    keys = f"dataset.root={str(root)!r}"
    return keys + (f" and dataset.archives={str(archives)!r}" if archives else "")


def _not_found(cls: type, root: str | Path, archives: str | Path | None, places: list[Path],
               missing: list[str]) -> str:
    searched = ", ".join(str(p.resolve()) for p in places)
    return (f"{_keys(root, archives)}: {cls.__name__} not found offline (dataset.download=false): "
            f"searched {searched} for {', '.join(missing)} (torchvision's archives, or their "
            f"extracted files). Fix: dataset.root or dataset.archives=<a folder holding those "
            f"files at those paths> (or SWEEP_ARCHIVES), or dataset.download=true (needs "
            f"internet).")


def open_torchvision(cls: type, root: str | Path, archives: str | Path | None,
                      download: bool) -> Any:
    given = root
    root = Path(root).expanduser()
    try:  # already extracted or downloaded into root
        return cls(str(root), train=True, download=False)
    except RuntimeError:
        pass
    # torchvision with download=False wants the extracted files; offline users often have only the
    # archives, maybe in a read-only folder: verify them and extract into our own root.
    places = [root] + ([Path(archives).expanduser()] if archives else [])
    found, missing = [], []
    for rel, md5 in _archives(cls):
        place = next((p for p in places if (p / rel).is_file()), None)
        if place is None:
            missing.append(rel)
        else:
            key = f"dataset.root={str(given)!r}" if place is root else (
                f"dataset.archives={str(archives)!r}")
            found.append((place / rel, md5, rel, f"{key}: "))
    if not missing:
        for path, md5, rel, where in found:
            _check_md5(path, md5, where)
            try:
                _extract(path, root / Path(rel).parent)
            except OSError as err:  # a read-only root, a file in the way, a full disk
                raise DataError(f"dataset.root={str(given)!r}: cannot extract {path.name} into "
                                f"{root.resolve() / Path(rel).parent} ({err.strerror or err}); "
                                "give dataset.root a folder you can write") from None
        return cls(str(root), train=True, download=False)
    if not download:
        raise DataError(_not_found(cls, given, archives, places, missing))
    try:
        return cls(str(root), train=True, download=True)
    except Exception as e:  # no network, proxy, mirror down...
        files = ", ".join(rel for rel, _ in _archives(cls))
        raise DataError(f"dataset.root={str(given)!r}: downloading {cls.__name__} into "
                        f"{root.resolve()} failed ({' '.join(str(e).split())}); without "
                        f"internet, set dataset.download=false and dataset.archives=<a folder "
                        f"holding {files}> (or SWEEP_ARCHIVES).") from e


def official_train_set(name: str, root: str | Path = "data", archives: str | Path | None = None,
                       download: bool = False) -> tuple[Tensor, Tensor]:
    """A torchvision dataset's official training set: uint8 images (N, C, H, W), int64 labels."""
    # Imported here: torchvision.datasets imports torchvision.models and torch._dynamo (about 1 s),
    # which a run on synthetic data never needs.
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name)
    ds = open_torchvision(cls, root, archives, download)
    images = torch.as_tensor(ds.data)
    # MNIST-like data is (N, H, W), CIFAR's (N, H, W, C).
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(ds.targets, dtype=torch.int64)
