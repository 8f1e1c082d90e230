"""A reader per dataset kind behind one :func:`load_dataset` (as timm's ``create_dataset``): each
returns a :class:`~ptqcal.data.splits.Dataset` of labelled images with a calibration pool and an
evaluation split (no torch)."""

from __future__ import annotations

import csv
import functools
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from .splits import MAX_LABEL, Dataset, Split, checked_split, checked_split_files

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}
DATASET_KINDS = ("digits", "cifar100", "cifar10", "imagenet", "folder", "csv", "npz")


@functools.lru_cache(maxsize=1)
def load_digits() -> Dataset:
    """scikit-learn's 1,797 real 8x8 digits: 300 train, 300 calibration pool, 1,197 evaluation.

    The split is fixed (seed 0) so that the trained model and the evaluation set do not depend
    on the run's seed; the run's seed only draws the calibration subset.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise UserError("the digits dataset needs scikit-learn: pip install 'ptqcal[torch]'") from exc
    bunch = sk_load_digits()
    everything = Split(bunch.images.astype(np.float32), bunch.target.astype(np.int64))
    order = np.random.default_rng(0).permutation(len(everything))
    return Dataset("digits", eval=everything.take(order[600:]), calib_pool=everything.take(order[300:600]),
                   train=everything.take(order[:300]))


def load_npz(path: Path) -> Dataset:
    """An ``.npz`` with ``images`` (N, H, W[, C]) and ``labels`` (N,), plus optional
    ``calib_images``/``calib_labels``; without them calibration images are held out."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as arrays:  # an object array would unpickle: refused
            stored = {key: arrays[key] for key in ("images", "labels", "calib_images", "calib_labels")
                      if key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path} is not a readable .npz file ({type(exc).__name__})") from None
    if "images" not in stored or "labels" not in stored:
        raise UserError(f"{path} is not an .npz with 'images' and 'labels' arrays")
    evaluation = checked_split(stored["images"], stored["labels"], str(path), minimum=2)
    calib = checked_split(stored["calib_images"], stored["calib_labels"], f"{path} (calibration)") \
        if "calib_images" in stored and "calib_labels" in stored else None
    if calib is not None and _pixel_shape(calib.images) != _pixel_shape(evaluation.images):
        raise UserError(f"{path}: its calibration images are {_shape_text(calib.images)} and its evaluation images "
                        f"{_shape_text(evaluation.images)}: both must have the model's size")
    return Dataset(path.stem, eval=evaluation, calib_pool=calib)


def _pixel_shape(images: np.ndarray) -> tuple[int, ...]:
    """(H, W, C) of an (N, H, W) or (N, H, W, C) array."""
    return images.shape[1:] + ((1,) if images.ndim == 3 else ())


def _shape_text(images: np.ndarray) -> str:
    height, width, channels = _pixel_shape(images)
    return f"{height}x{width} with {channels} channel{'s' * (channels != 1)}"


def _cifar_folder(root: Path, classes: int) -> Path:
    name = "cifar-100-python" if classes == 100 else "cifar-10-batches-py"
    for candidate in (root / name, root):
        if (candidate / ("test" if classes == 100 else "test_batch")).is_file():
            return candidate
    raise UserError(f"no {name} folder under {root}: give --data-dir or $PTQCAL_CIFAR{classes}_DIR "
                    "(or --download when online)")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the official CIFAR files hold: dicts, lists, strings, bytes, ints and
    uint8 numpy arrays. Any other global a pickle names (the way a crafted file runs code) is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR file holds")
        if module == "numpy.core.multiarray":  # what numpy 1 wrote; numpy 2 keeps it in numpy._core
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def _read_cifar_pickles(files: list[Path], label_key: str) -> Split:
    images, labels = [], []
    for file in files:
        if not file.is_file():  # a pipe would block forever
            raise UserError(f"{file} is not a CIFAR python file (not a regular file)")
        try:
            with open(file, "rb") as handle:
                batch = _CifarUnpickler(handle, encoding="bytes").load()
            data = batch[b"data"]
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError("its 'data' is not an (N, 3072) uint8 array")
            batch_labels = np.asarray(batch[label_key.encode()])
            if batch_labels.dtype.kind not in "iu" or batch_labels.shape != (len(data),):
                raise ValueError(f"its {label_key!r} are not {len(data)} integers")
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, IndexError,
                AttributeError) as exc:
            raise UserError(f"{file} is not a CIFAR python file: {exc}") from None
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return Split(np.concatenate(images), np.concatenate(labels).astype(np.int64))


def load_cifar(root: Path | None, classes: int = 100, download: bool = False) -> Dataset:
    """The official python pickles: train split as calibration pool, test split evaluated."""
    root = Path(root or os.environ.get(f"PTQCAL_CIFAR{classes}_DIR", "") or "data")
    if download:
        try:
            from torchvision import datasets
        except ImportError as exc:
            raise UserError("--download needs torchvision: pip install 'ptqcal[torch]'") from exc
        try:
            (datasets.CIFAR100 if classes == 100 else datasets.CIFAR10)(str(root), download=True)
        except Exception as exc:  # URLError, HTTPError, ...
            raise UserError(f"could not download CIFAR-{classes} ({type(exc).__name__}); "
                            "give --data-dir with the extracted pickles") from exc
    folder = _cifar_folder(root, classes)
    if classes == 100:
        train = _read_cifar_pickles([folder / "train"], "fine_labels")
        test = _read_cifar_pickles([folder / "test"], "fine_labels")
    else:
        train = _read_cifar_pickles(sorted(folder.glob("data_batch_*")), "labels")
        test = _read_cifar_pickles([folder / "test_batch"], "labels")
    return Dataset(f"cifar{classes}", eval=test, calib_pool=train)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_folder(root: Path, classes: list[str] | None = None) -> Split:
    """Class sub-folders (sorted names, or ``classes`` order) of images."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root}")
    names = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for index, name in enumerate(names):
        found = _images_under(root / name) if (root / name).is_dir() else []
        paths += found
        labels += [index] * len(found)
    if not paths:
        raise UserError(f"no images found in class sub-folders of {root}")
    return Split(paths, np.asarray(labels, dtype=np.int64))


def load_csv(path: Path) -> Split:
    """Rows of ``path,label[,...]`` (a header row is allowed; extra columns are ignored). Relative
    paths are from the CSV's folder and must stay inside it; absolute paths are taken as given."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    folder = path.parent.resolve()
    paths, labels = [], []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row or (number == 1 and len(row) > 1 and not row[1].strip().lstrip("-").isdigit()):
                    continue  # a header
                try:
                    image, label = row[0].strip(), int(row[1])
                except (IndexError, ValueError):
                    raise UserError(f"{path}:{number}: expected 'path,label', got {row[:2]!r}") from None
                if not 0 <= label <= MAX_LABEL:
                    raise UserError(f"{path}:{number}: label {label} is not a class index (0 or more)")
                paths.append(_inside(folder, image, f"{path}:{number}"))
                labels.append(label)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} is not a readable CSV file ({type(exc).__name__})") from None
    if not paths:
        raise UserError(f"no images listed in {path}")
    return checked_split_files(paths, labels, str(path))


def _inside(folder: Path, name: str, where: str) -> Path:
    """``name`` resolved against ``folder``; a relative one that leaves the folder is refused."""
    if "\x00" in name or not name:
        raise UserError(f"{where}: an empty or invalid image path")
    if Path(name).is_absolute():
        return Path(name)
    resolved = (folder / name).resolve()
    if not resolved.is_relative_to(folder):
        raise UserError(f"{where}: {name!r} leaves the CSV's folder; give a path inside it, or an absolute path")
    return resolved


def _load_name_label_file(path: Path, folder: Path) -> Split:
    """Lines of ``file_name label`` naming images in ``folder``."""
    if not path.is_file():
        raise UserError(f"labels file not found: {path}")
    names, labels = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file of 'file_name label' lines") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            name, label = line.split()
            labels.append(int(label))
        except ValueError:
            raise UserError(f"{path}:{number}: expected 'file_name label', got {line!r}") from None
        if not 0 <= labels[-1] <= MAX_LABEL:
            raise UserError(f"{path}:{number}: label {labels[-1]} is not a class index (0 or more)")
        names.append(_inside(folder.resolve(), name, f"{path}:{number}"))
    if not names:
        raise UserError(f"no images listed in {path}")
    return checked_split_files(names, labels, str(path))


def load_imagenet(root: Path | None, labels_file: Path | None = None) -> Dataset:
    """ILSVRC2012 validation images: class sub-folders named by WNID (sorted = torchvision's
    class order), or a flat folder with a labels file (``name label`` or CSV rows). Calibration
    images come from ``train/`` next to ``val/`` when present, else are held out of val."""
    root = Path(root or os.environ.get("PTQCAL_IMAGENET_DIR", "") or "data/imagenet")
    if not root.is_dir():
        raise UserError(f"ImageNet folder not found: {root} (give --data-dir or $PTQCAL_IMAGENET_DIR)")
    val = root / "val" if (root / "val").is_dir() else root
    if labels_file is None:
        evaluation = load_folder(val)
    elif Path(labels_file).suffix == ".csv":
        evaluation = load_csv(labels_file)
    else:
        evaluation = _load_name_label_file(Path(labels_file), val)
    train = root / "train"
    calib = load_folder(train) if train.is_dir() and val != root else None
    return Dataset("imagenet", eval=evaluation, calib_pool=calib)


def _needs_location(kind: str, data: str | Path | None) -> Path:
    if data is None:
        raise UserError(f"--dataset {kind} needs --data-dir PATH")
    return Path(data)


def _single(kind: str, data: str | Path | None, read: Callable[[Path], Split]) -> Dataset:
    """A dataset of one split (calibration images held out of it), named after its location."""
    location = _needs_location(kind, data)
    return Dataset(location.stem if kind == "csv" else location.name, eval=read(location))


# kind -> reader(location or None, labels file or None, download): one entry per kind, as timm's
# dataset factory maps names to classes
READERS: dict[str, Callable[[str | Path | None, Path | None, bool], Dataset]] = {
    "digits": lambda data, labels, download: load_digits(),
    "cifar100": lambda data, labels, download: load_cifar(Path(data) if data else None, 100, download),
    "cifar10": lambda data, labels, download: load_cifar(Path(data) if data else None, 10, download),
    "imagenet": lambda data, labels, download: load_imagenet(Path(data) if data else None, labels),
    "folder": lambda data, labels, download: _single("folder", data, load_folder),
    "csv": lambda data, labels, download: _single("csv", data, load_csv),
    "npz": lambda data, labels, download: load_npz(_needs_location("npz", data)),
}
assert tuple(READERS) == DATASET_KINDS


def load_dataset(kind: str, data: str | Path | None = None, labels: Path | None = None,
                 download: bool = False) -> Dataset:
    """A dataset by kind (see :data:`DATASET_KINDS`; ``FILE.npz`` names an ``npz`` dataset) and its
    location."""
    if kind.endswith(".npz"):  # --dataset FILE.npz: the file, unless another location is given (a calibration pool)
        kind, data = "npz", kind if data is None else data
    if kind not in READERS:
        raise UserError(f"unknown dataset {kind!r}: choose one of {', '.join(DATASET_KINDS)} or an .npz file")
    return READERS[kind](data, labels, download)
