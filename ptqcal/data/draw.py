"""The one place images are drawn, for every purpose: calibration draws, the evaluation split, the
images held out for a search, and a seeded subset. Every draw is a function of the seed alone, so a
run's images never depend on how or where it runs."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .splits import Dataset, Split

DEFAULT_CALIB_SIZE = 256
DEFAULT_SEARCH_SIZE = 512  # images a layer-by-layer attribution or a mixed-precision search measures on


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
    calib = pool.take(chosen)
    shared = _shared(calib, evaluation) if dataset.calib_pool is not None else 0
    if shared:  # a calibration pool given apart can still hold evaluation images: said, not refused
        note = (f"{note}. " if note else "") + (f"{shared} of the {len(calib)} calibration images are also evaluation "
                                                "images (the same file or pixels): on those the quantized models saw "
                                                "their activations' ranges, so their numbers may be optimistic.")
    return Selection(calib, evaluation, dataset.calib_pool is None, note, search, search_note)


def _shared(first: Split, second: Split) -> int:
    """How many images of ``first`` are also in ``second``: the same file (symbolic links followed) or
    the same pixels."""
    if first.is_files != second.is_files:
        return 0

    def key(image) -> object:
        if first.is_files:
            return os.path.realpath(image)
        return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()

    theirs = {key(image) for image in second.images}
    return sum(key(image) in theirs for image in first.images)


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


def seeded_subset(split: Split, size: int, seed: int) -> Split:
    """``size`` images of ``split`` (all when fewer) drawn with ``seed``, in their original order."""
    return split.take(np.sort(np.random.default_rng(seed).permutation(len(split))[:size]))
