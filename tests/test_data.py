"""Datasets: loaders, decoding as torchvision does it, reproducible disjoint selections."""

import pickle

import numpy as np
import pytest
from PIL import Image

from ptqcal.data import (Dataset, Split, decode_images, load_cifar, load_csv, load_dataset, load_folder,
                         load_image, select)
from ptqcal.errors import InputError

from conftest import SHARED


def _write_images(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for index, (w, h) in enumerate(sizes):
        path = folder / f"img{index}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_resize_and_crop_equal_torchvision(tmp_path):
    transforms = pytest.importorskip("torchvision.transforms")
    paths = _write_images(tmp_path, [(300, 400), (500, 256), (256, 256), (333, 999), (224, 300)])
    real = sorted((SHARED / "data/imagenet_samples/images").glob("*.jpg"))[:10]
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    for path in paths + real:
        with Image.open(path) as image:
            expected = np.asarray(reference(image.convert("RGB")))
        np.testing.assert_array_equal(load_image(path, (3, 224, 224), resize=256), expected)


def test_selection_is_reproducible_and_disjoint():
    split = Split(np.arange(100).reshape(100, 1, 1), np.arange(100) % 10)
    held_out = Dataset("d", eval=split)
    a, b = select(held_out, 30, seed=5), select(held_out, 30, seed=5)
    np.testing.assert_array_equal(a.calib.images, b.calib.images)
    calib_ids, eval_ids = set(a.calib.images.ravel()), set(a.eval.images.ravel())
    assert len(calib_ids) == 30 and len(eval_ids) == 70 and not calib_ids & eval_ids and a.held_out_from_eval
    assert set(select(held_out, 30, seed=6).calib.images.ravel()) != calib_ids
    pooled = Dataset("d", eval=split, calib_pool=Split(np.arange(100, 150).reshape(50, 1, 1), np.zeros(50, int)))
    chosen = select(pooled, 20, seed=0, eval_size=40)
    assert len(chosen.eval) == 40 and chosen.calib.images.min() >= 100 and not chosen.held_out_from_eval
    with pytest.raises(InputError, match="larger than"):
        select(pooled, 51, seed=0)


def test_cifar_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 4)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        batch = {b"data": images.transpose(0, 3, 1, 2).reshape(n, -1), b"fine_labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(batch))
        if name == "test":
            expected = images
    dataset = load_cifar(tmp_path, 100)
    assert len(dataset.calib_pool) == 6 and len(dataset.eval) == 4
    np.testing.assert_array_equal(dataset.eval.images, expected)  # HWC pixels, as the pickles' CHW rows
    np.testing.assert_array_equal(dataset.eval.labels, [0, 1, 2, 3])
    with pytest.raises(InputError, match="cifar-100-python"):
        load_cifar(tmp_path / "nowhere", 100)


def test_folder_and_csv(tmp_path):
    for name in ("b_cat", "a_dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        _write_images(tmp_path / "data" / name, [(40, 30), (30, 40)])
    split = load_folder(tmp_path / "data")
    assert list(split.labels) == [0, 0, 1, 1]  # sorted class names: a_dog = 0
    assert split.images[0].parent.name == "a_dog"
    (tmp_path / "list.csv").write_text("path,label,name\ndata/a_dog/img0.png,3,dog\ndata/b_cat/img1.png,7,cat\n")
    listed = load_csv(tmp_path / "list.csv")
    assert list(listed.labels) == [3, 7] and listed.images[1].name == "img1.png"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_folder(tmp_path / "empty")
    with pytest.raises(InputError, match="needs --data-dir"):
        load_dataset("folder")


def test_undecodable_images_are_skipped_or_fatal_with_strict(tmp_path):
    good = _write_images(tmp_path, [(40, 40), (50, 40)])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    split = Split(good + [broken], np.array([0, 1, 2]))
    with pytest.warns(UserWarning, match="broken.jpg"):
        decoded, failed = decode_images(split, (3, 32, 32))
    assert failed == [broken] and decoded.images.shape == (2, 32, 32, 3) and list(decoded.labels) == [0, 1]
    with pytest.raises(InputError, match="broken.jpg"):
        decode_images(split, (3, 32, 32), strict=True)


def test_imagenet_class_folders_with_train_and_flat_with_labels(tmp_path):
    from ptqcal.data import load_imagenet

    for split, wnids in (("val", ["n02", "n01"]), ("train", ["n01", "n02"])):
        for wnid in wnids:
            (tmp_path / split / wnid).mkdir(parents=True)
            _write_images(tmp_path / split / wnid, [(30, 30)])
    dataset = load_imagenet(tmp_path)
    assert list(dataset.eval.labels) == [0, 1] and dataset.eval.images[0].parent.name == "n01"  # sorted WNIDs
    assert dataset.calib_pool is not None and len(dataset.calib_pool) == 2
    flat = tmp_path / "flat"
    flat.mkdir()
    paths = _write_images(flat, [(30, 30), (30, 30)])
    (tmp_path / "labels.txt").write_text(f"{paths[0].name} 7\n{paths[1].name} 3\n")
    flat_dataset = load_imagenet(flat, tmp_path / "labels.txt")
    assert list(flat_dataset.eval.labels) == [7, 3] and flat_dataset.calib_pool is None
    with pytest.raises(InputError, match="ImageNet folder not found"):
        load_imagenet(tmp_path / "missing")
    (tmp_path / "bad.txt").write_text(f"{paths[0].name} 7\n{paths[1].name}\n")
    with pytest.raises(InputError, match=r"bad.txt:2: expected 'file_name label'"):
        load_imagenet(flat, tmp_path / "bad.txt")
    with pytest.raises(InputError, match="labels file not found"):
        load_imagenet(flat, tmp_path / "nope.txt")


def test_a_calibration_pool_holding_evaluation_images_is_said_in_a_note(tmp_path):
    """A pool given apart (``--calib-data``) can hold evaluation images: counted by pixels for arrays
    and by file (links followed) for files, and said; disjoint ones say nothing."""
    from ptqcal.data import Dataset, Split, select

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 4, 4, 3)).astype(np.uint8)
    labels = np.arange(10) % 3
    shared = Dataset("npz", Split(images, labels), calib_pool=Split(images[:5].copy(), labels[:5]))
    note = select(shared, 5, 0).calib_note
    assert note is not None and note.startswith("5 of the 5 calibration images are also evaluation images")
    apart = Dataset("npz", Split(images[5:], labels[5:]), calib_pool=Split(images[:5], labels[:5]))
    assert select(apart, 5, 0).calib_note is None
    files = []
    for index in range(4):
        files.append(tmp_path / f"{index}.png")
        files[-1].write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(files[0])
    linked = Dataset("folder", Split(files, np.zeros(4, np.int64)),
                     calib_pool=Split([tmp_path / "link.png"], np.zeros(1, np.int64)))
    assert select(linked, 1, 0).calib_note.startswith("1 of the 1 calibration images")


def test_a_runs_images_are_hashed_once_whatever_keys_it_asks_and_a_new_run_hashes_them_again(monkeypatch):
    """Every logits key starts from the images' digest: asked for by the clean pixels, a corrupted copy
    and again, the array is hashed once, and the digest travels with a pickled copy (a Ray task's).
    Pixels made again (a later run) hash the array again: changed in place, it gets another key."""
    from ptqcal.cache import array_digest
    from ptqcal.data import Pixels, pixels
    from ptqcal.data.corrupt import Corruption
    from ptqcal.models.preprocess import CIFAR100_PREPROCESS

    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    split, hashed = Split(images, np.arange(6)), []

    def counting(array):
        hashed.append(array.shape)
        return array_digest(array)

    monkeypatch.setattr(pixels, "array_digest", counting)
    clean = Pixels(split, CIFAR100_PREPROCESS)
    keys = [clean.key, clean.corrupted(Corruption("contrast", 2), 0).key, clean.key]
    assert hashed == [images.shape] and keys[0] == keys[2] == array_digest(images) != keys[1]
    assert pickle.loads(pickle.dumps(clean)).key == keys[0] and hashed == [images.shape]
    images[0, 0, 0, 0] ^= 1
    assert Pixels(split, CIFAR100_PREPROCESS).key == array_digest(images) != keys[0]
