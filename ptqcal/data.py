"""Datasets as labelled images with a calibration pool and an evaluation split (no torch).

Image files are decoded, resized and centre-cropped for the model in parallel worker threads
(PIL releases the GIL while decoding and resizing) into one uint8 array; normalisation happens
batch by batch when a model consumes them.
"""

from __future__ import annotations

import csv
import functools
import os
import pickle
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

DEFAULT_CALIB_SIZE = 256
DEFAULT_SEARCH_SIZE = 512  # images a layer-by-layer attribution or a mixed-precision search measures on
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}
DATASET_KINDS = ("digits", "cifar100", "cifar10", "imagenet", "folder", "csv", "npz")


@dataclass(frozen=True)
class Split:
    """Labelled images: raw pixels ``(N, H, W[, C])`` or image file paths."""

    images: np.ndarray | list[Path]
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_files(self) -> bool:
        return isinstance(self.images, list)

    def take(self, index: np.ndarray) -> "Split":
        images = [self.images[i] for i in index] if self.is_files else self.images[index]
        return Split(images, self.labels[index])


@dataclass(frozen=True)
class Dataset:
    name: str
    eval: Split
    calib_pool: Split | None = None  # None: calibration images are held out of ``eval``
    train: Split | None = None  # only for datasets a built-in model is trained on


@dataclass(frozen=True)
class Selection:
    """The calibration and evaluation images of one run, drawn reproducibly and disjoint."""

    calib: Split
    eval: Split
    held_out_from_eval: bool
    calib_note: str | None = None  # how a default calibration size was adapted to the data
    search: Split | None = None  # held out of evaluation for a search whose result is then evaluated
    search_note: str | None = None  # how a default search size was adapted to the data


def select(dataset: Dataset, calib_size: int | None, seed: int, eval_size: int | None = None,
           repeat: int = 0, repeats: int = 1, search_size: int | None | bool = False) -> Selection:
    """Draw ``calib_size`` calibration images for calibration repeat ``repeat`` (seed + repeat).

    They come from the calibration pool, or, when the dataset has none, from images held out of
    the evaluation split (with ``seed``, the same for every repeat: ``calib_size`` of them for one
    repeat, twice that for several). The evaluation images never change across repeats and never
    overlap the calibration images. ``calib_size=None`` takes :data:`DEFAULT_CALIB_SIZE`, or fewer
    when the data has fewer to spare (``Selection.calib_note`` says so).

    ``search_size`` (``None``: :data:`DEFAULT_SEARCH_SIZE`, or half the evaluation images when
    fewer; ``False``: none) images are then held out of the evaluation split with ``seed``, for a
    search whose choice is evaluated on the images it never saw.
    """
    if calib_size is not None and calib_size < 1:
        raise UserError(f"--calib-size must be at least 1, got {calib_size}")
    evaluation, pool = dataset.eval, dataset.calib_pool
    note = None
    if calib_size is None:
        spare = len(pool) if pool is not None else len(evaluation) // (2 if repeats == 1 else 4)
        calib_size = min(DEFAULT_CALIB_SIZE, max(1, spare))
        if calib_size < DEFAULT_CALIB_SIZE:
            note = (f"{calib_size} calibration images: the whole calibration pool, fewer than the default "
                    f"{DEFAULT_CALIB_SIZE}" if pool is not None else
                    f"{calib_size} calibration images held out of {len(evaluation)} (fewer than the default "
                    f"{DEFAULT_CALIB_SIZE}, to leave images to evaluate)")
    if pool is None:
        held = calib_size if repeats == 1 else 2 * calib_size
        if held >= len(evaluation):
            raise UserError(f"--calib-size {calib_size} leaves no evaluation images: the dataset has "
                            f"{len(evaluation)} images and no separate calibration pool")
        order = np.random.default_rng(seed).permutation(len(evaluation))
        pool, evaluation = evaluation.take(np.sort(order[:held])), evaluation.take(np.sort(order[held:]))
    if calib_size > len(pool):
        raise UserError(f"--calib-size {calib_size} is larger than the calibration pool ({len(pool)} images)")
    search, search_note = None, None
    if search_size is not False:
        evaluation, search, search_note = _hold_out_search(evaluation, search_size, seed)
    if eval_size is not None and eval_size < len(evaluation):
        evaluation = evaluation.take(np.sort(np.random.default_rng(seed).choice(len(evaluation), eval_size,
                                                                                replace=False)))
    chosen = np.sort(np.random.default_rng(seed + repeat).choice(len(pool), size=calib_size, replace=False))
    return Selection(pool.take(chosen), evaluation, dataset.calib_pool is None, note, search, search_note)


def _hold_out_search(evaluation: Split, size: int | None, seed: int) -> tuple[Split, Split, str | None]:
    """(evaluation left, search images, note): ``size`` evaluation images held out for a search."""
    note = None
    if size is None:
        size = min(DEFAULT_SEARCH_SIZE, len(evaluation) // 2)
        if size < DEFAULT_SEARCH_SIZE:
            note = (f"{size} of the {len(evaluation)} evaluation images held out for the search (fewer than the "
                    f"default {DEFAULT_SEARCH_SIZE}, to leave half to evaluate)")
    if size < 1 or size >= len(evaluation):
        raise UserError(f"--attribution-size {size} leaves no images to evaluate the search's choice on: the "
                        f"evaluation split has {len(evaluation)} images")
    order = np.random.default_rng([seed, 1]).permutation(len(evaluation))  # a draw apart from calibration's
    return evaluation.take(np.sort(order[size:])), evaluation.take(np.sort(order[:size])), note


# --- decoding ---------------------------------------------------------------------------------

def load_image(path: Path, size: tuple[int, int, int], resize: int | None = None,
               interpolation: str = "bilinear") -> np.ndarray:
    """Decode one image to ``(H, W, C)`` uint8 as torchvision's ``Resize(resize)`` +
    ``CenterCrop((H, W))`` would on a PIL image; without ``resize``, resize straight to (H, W)."""
    from PIL import Image

    channels, height, width = size
    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[interpolation]
    with Image.open(path) as image:
        if image.width * image.height > Image.MAX_IMAGE_PIXELS:  # PIL would only warn (a decompression bomb)
            raise ValueError(f"{image.width}x{image.height} pixels is too large to decode")
        image = image.convert("RGB" if channels == 3 else "L")
        if resize is None:
            image = image.resize((width, height), method)
        else:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = resize, int(resize * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            if (new_w, new_h) != (w, h):
                image = image.resize((new_w, new_h), method)
            left = int(round((new_w - width) / 2.0))
            top = int(round((new_h - height) / 2.0))
            image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.uint8)
    return array if channels == 3 else array[..., None]


def decode_images(split: Split, size: tuple[int, int, int], resize: int | None = None,
                  interpolation: str = "bilinear", strict: bool = False, workers: int | None = None,
                  allow_empty: bool = False) -> tuple[Split, list[Path]]:
    """Decode a file split in parallel threads; images that fail are dropped (or raise with
    ``strict``) and returned by path. That none decodes is an error unless ``allow_empty``."""
    if not split.is_files:
        return split, []
    workers = workers or min(8, os.cpu_count() or 1)

    def decode(path: Path) -> np.ndarray | None:
        try:
            return load_image(path, size, resize, interpolation)
        except Exception as exc:  # PIL raises many types for broken files
            if strict:
                raise UserError(f"cannot decode {path}: {exc}") from exc
            return None

    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(decode, split.images))
    ok = np.array([d is not None for d in decoded], dtype=bool)
    failed = [p for p, good in zip(split.images, ok) if not good]
    for path in failed:
        warnings.warn(f"skipped an image that fails to decode: {path}", stacklevel=2)
    if not ok.any() and not allow_empty:
        raise UserError("none of the images could be decoded")
    channels, height, width = size
    images = np.stack([d for d in decoded if d is not None]) if ok.any() else \
        np.empty((0, height, width, channels), np.uint8)
    return Split(images, split.labels[ok]), failed


# --- dataset kinds ----------------------------------------------------------------------------

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


def checked_split(images: np.ndarray, labels: np.ndarray, where: str, minimum: int = 1) -> Split:
    """Pixels ``(N, H, W[, C])`` of a real number type, all finite, with ``N`` integer labels >= 0;
    anything else is one line naming ``where``."""
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"{where}: labels must be one integer per image, got {labels.dtype} of shape "
                        f"{list(labels.shape)}")
    if len(labels) and labels.min() < 0:
        raise UserError(f"{where}: labels must be class indices >= 0, found {labels.min()}")
    if images.ndim not in (3, 4) or images.dtype.kind not in "uif" or (images.ndim == 4 and images.shape[3] > 4):
        raise UserError(f"{where}: images must be (N, H, W) or (N, H, W, C) pixel arrays, got {images.dtype} of "
                        f"shape {list(images.shape)}")
    if len(images) != len(labels) or len(labels) < minimum:
        raise UserError(f"{where}: {len(images)} images and {len(labels)} labels (at least {minimum} needed)")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise UserError(f"{where}: images hold NaN or infinite values")
    return Split(images, labels.astype(np.int64))


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
    return Dataset(path.stem, eval=evaluation, calib_pool=calib)


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


def checked_split_files(paths: list[Path], labels: list[int], where: str) -> Split:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0:
        raise UserError(f"{where}: labels must be class indices >= 0, found {labels.min()}")
    return Split(paths, labels)


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
        names.append(_inside(folder.resolve(), name, f"{path}:{number}"))
    if not names:
        raise UserError(f"no images listed in {path}")
    return Split(names, np.asarray(labels, dtype=np.int64))


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


def load_dataset(kind: str, data: str | Path | None = None, labels: Path | None = None,
                 download: bool = False) -> Dataset:
    """A dataset by kind (see :data:`DATASET_KINDS`) and its location."""
    if kind.endswith(".npz"):  # --dataset FILE.npz
        kind, data = "npz", kind
    if kind == "digits":
        return load_digits()
    if kind in ("cifar100", "cifar10"):
        return load_cifar(Path(data) if data else None, int(kind[5:]), download)
    if kind == "imagenet":
        return load_imagenet(Path(data) if data else None, labels)
    if data is None:
        raise UserError(f"--dataset {kind} needs --data-dir PATH")
    if kind == "npz":
        return load_npz(Path(data))
    if kind == "folder":
        return Dataset(Path(data).name, eval=load_folder(Path(data)))
    if kind == "csv":
        return Dataset(Path(data).stem, eval=load_csv(Path(data)))
    raise UserError(f"unknown dataset {kind!r}: choose one of {', '.join(DATASET_KINDS)} or an .npz file")
