"""The ci profile's data: scikit-learn's 8×8 digits, seeded stratified splits, seeded batch orders (the same batches
for every method) and the one-pixel shifts the digit models were pretrained with."""

from __future__ import annotations

import torch


def digits(classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 handwritten digits of ``classes``: images (N, 1, 8, 8) in [0, 1], labels (N,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = torch.isin(torch.as_tensor(data.target), torch.tensor(classes))
    images = torch.as_tensor(data.images, dtype=torch.float32)[keep] / 16.0
    return images[:, None], torch.as_tensor(data.target)[keep]


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices), each class split in the same proportion with a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of ``step``'s batch: epochs of seeded random permutations of range(n), so every method sees the
    same batches in the same order."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[i * batch_size:(i + 1) * batch_size]


def shift_pixels(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel in each direction (zero padding): (N, 1, 8, 8) -> same."""
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]
