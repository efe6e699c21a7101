"""MIL bags from scikit-learn's bundled digits (8x8 images, offline), the "MNIST-bags" protocol of
Ilse et al. (ICML 2018): a bag is a set of digit images and is positive iff it holds the target digit.

Images are split into disjoint train/test pools first, so test bags hold unseen images. Bag sizes
are drawn from a normal distribution (rounded, at least 1); a share ``positive_rate`` of the bags
is positive: a negative bag draws only non-target images, a positive bag draws from all images and
gets one target image at a random place if it drew none.

Legend: B bags, N instances (padded to the largest bag), F = 64 pixel features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, kw_only=True)
class BagsConfig:
    target: int = 9  # the digit that makes a bag positive
    bag_mean: float = 10.0  # mean bag size
    bag_std: float = 2.0  # bag size spread
    train_bags: int = 100
    test_bags: int = 400
    positive_rate: float = 0.5  # share of positive bags in each split
    test_fraction: float = 0.3  # share of the images held out for test bags

    def __post_init__(self):
        if self.target not in range(10):
            raise ValueError(f"bags target must be a digit 0-9, got {self.target!r}")
        if self.bag_mean < 1 or self.bag_std < 0:
            raise ValueError(f"bags need bag_mean >= 1 and bag_std >= 0, got {self.bag_mean}, {self.bag_std}")
        if self.train_bags < 2 or self.test_bags < 2:
            raise ValueError(f"bags need train_bags and test_bags >= 2, got {self.train_bags}, {self.test_bags}")
        if not 0 < self.positive_rate < 1:
            raise ValueError(f"bags positive_rate must be in (0, 1), got {self.positive_rate}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"bags test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class Bags:
    """x (B, N, F) in [0, 1]; mask (B, N) real instances; y (B,) bag labels in {0, 1};
    instance_y (B, N) 1 where the instance is the target digit; digits (B, N) the digit (-1: padding)."""

    x: torch.Tensor
    mask: torch.Tensor
    y: torch.Tensor
    instance_y: torch.Tensor
    digits: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 64) pixels scaled to [0, 1] and (1797,) labels, from scikit-learn (no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ValueError("MIL bags need scikit-learn: pip install 'mixattn[mil]' (or scikit-learn)") from e
    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def _make_split(pix, labels, n_bags: int, cfg: BagsConfig, rng: np.random.Generator) -> Bags:
    pos_idx, neg_idx = np.flatnonzero(labels == cfg.target), np.flatnonzero(labels != cfg.target)
    n_pos = int(round(n_bags * cfg.positive_rate))
    bag_labels = rng.permutation(np.r_[np.ones(n_pos, dtype=np.int64), np.zeros(n_bags - n_pos, dtype=np.int64)])
    sizes = np.maximum(1, np.rint(rng.normal(cfg.bag_mean, cfg.bag_std, n_bags))).astype(int)
    members = []
    for label, n in zip(bag_labels, sizes):
        if label:
            idx = rng.choice(len(labels), n)
            if not (labels[idx] == cfg.target).any():
                idx[rng.integers(n)] = rng.choice(pos_idx)
        else:
            idx = rng.choice(neg_idx, n)
        members.append(idx)
    N = int(sizes.max())
    x = torch.zeros(n_bags, N, pix.shape[1])
    digits = torch.full((n_bags, N), -1, dtype=torch.long)
    for b, idx in enumerate(members):
        x[b, : len(idx)] = torch.from_numpy(pix[idx])
        digits[b, : len(idx)] = torch.from_numpy(labels[idx])
    return Bags(x, digits >= 0, torch.from_numpy(bag_labels), (digits == cfg.target).long(), digits)


def make_bags(cfg: BagsConfig, seed: int = 0) -> tuple[Bags, Bags]:
    """(train, test) bags; the same seed gives the same bags."""
    pix, labels = load_digits_arrays()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_test = int(len(labels) * cfg.test_fraction)
    test_i, train_i = order[:n_test], order[n_test:]
    train = _make_split(pix[train_i], labels[train_i], cfg.train_bags, cfg, rng)
    test = _make_split(pix[test_i], labels[test_i], cfg.test_bags, cfg, rng)
    return train, test
