"""The data room: datasets and their readers, decoding, the one place images are drawn, and the
pixel stream a model reads (no torch, no onnxruntime).

- :mod:`.splits`: :class:`Split` and :class:`Dataset`, and the checks every reader applies;
- :mod:`.readers`: a reader per dataset kind behind :func:`load_dataset`;
- :mod:`.draw`: calibration, evaluation and search images drawn with the seed;
- :mod:`.decode`: image files to uint8 pixels at the model's size;
- :mod:`.pixels`: a split's pixels streamed chunk by chunk, cached and prefetched.
"""

from .decode import decode_images, load_image
from .draw import DEFAULT_CALIB_SIZE, DEFAULT_SEARCH_SIZE, Selection, seeded_subset, select
from .readers import (DATASET_KINDS, IMAGE_SUFFIXES, READERS, load_cifar, load_csv, load_digits, load_folder,
                      load_imagenet, load_npz, load_dataset)
from .pixels import Pixels
from .splits import Dataset, Split, checked_split, checked_split_files

__all__ = ["DATASET_KINDS", "DEFAULT_CALIB_SIZE", "DEFAULT_SEARCH_SIZE", "Dataset", "IMAGE_SUFFIXES", "Pixels", "READERS",
           "Selection", "Split", "checked_split", "checked_split_files", "decode_images", "load_cifar", "load_csv",
           "load_dataset", "load_digits", "load_folder", "load_image", "load_imagenet", "load_npz", "seeded_subset",
           "select"]
