"""Shared data loading for the examples: scikit-learn's digits (ships with the package)."""

from __future__ import annotations

import torch


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1], stratified 75/25 split, standardised with the train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X / 16.0, y, test_size=0.25, stratify=y, random_state=seed)
    X_tr, X_te = torch.tensor(X_tr, dtype=torch.float32), torch.tensor(X_te, dtype=torch.float32)
    mean, std = X_tr.mean(0), X_tr.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a few border pixels are always 0
    return (X_tr - mean) / std, torch.tensor(y_tr), (X_te - mean) / std, torch.tensor(y_te)
