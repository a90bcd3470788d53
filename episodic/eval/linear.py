"""Linear probe on frozen features: multinomial logistic regression (L-BFGS, L2 penalty).

Features are standardised with the training split's mean and std; the probe is fitted on the
train split and its top-1 accuracy reported on the test split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, weight_decay: float = 1e-4,
                 max_iter: int = 200) -> float:
    """Fit softmax regression on ``train`` features, return accuracy (%) on ``test``."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = ((train_x - mu) / sd).double(), ((test_x - mu) / sd).double()
    classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(xtr.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, train_y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == test_y).double().mean() * 100)
