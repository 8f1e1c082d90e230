"""Loading a registry model's weights (torch is imported only when a function runs)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ptqcal.errors import InputError

if TYPE_CHECKING:
    from torch import nn

RANDOM_WEIGHTS = Path("random")  # weights "random": untrained initialisation (seed 0), for smoke tests


class ModelError(InputError):
    """A model that cannot be built, loaded or read as a classifier."""


@contextmanager
def seeded_init(seed: int = 0) -> Iterator[None]:
    """Random initialisation that is the same on every run (it keys caches and appears in
    reports), without touching the caller's torch RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_state_dict_strict(model: "nn.Module", weights: Path) -> "nn.Module":
    """Load a state dict (``torch.load(weights_only=True)``: a file never runs code) into
    ``model``, naming the missing, unexpected and mis-shaped keys when it does not fit.

    Returns the model in eval mode. Raises :class:`ModelError` for a missing or foreign file.
    """
    import torch

    if not Path(weights).is_file():
        raise ModelError(f"weights file not found: {weights}", setting="weights")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{weights} is not a PyTorch state dict ({type(exc).__name__})", setting="weights") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", mismatched)) if keys]
        raise ModelError(f"{weights} does not match the architecture ({'; '.join(parts)})", setting="weights")
    model.load_state_dict(state, strict=True)
    return model.eval()


def random_or_loaded(model_factory, weights: Path) -> "nn.Module":
    """``model_factory()`` with seeded random weights (``weights == RANDOM_WEIGHTS``) or the file's."""
    with seeded_init():
        model = model_factory()
    return model.eval() if weights == RANDOM_WEIGHTS else load_state_dict_strict(model, weights)
