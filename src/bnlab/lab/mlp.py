"""The paper's MNIST network (Ioffe & Szegedy 2015, section 4.1) and its training loop.

3 fully connected hidden layers of 100 sigmoid units, small random Gaussian initialization, a 10-way
softmax with cross-entropy, mini-batches of 60; with BN, every hidden layer's pre-activation
x = W u is normalized before the sigmoid (its bias is dropped: beta takes its place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data import Split
from ..nn import BatchNorm1d


def sigmoid_mlp(
    in_features: int,
    num_classes: int = 10,
    hidden: int = 100,
    depth: int = 3,
    batch_norm: bool = False,
    init_std: float = 0.01,
) -> nn.Sequential:
    """Linear -> [BN] -> sigmoid, ``depth`` times, then a Linear to the class logits."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers.append(nn.Linear(width, hidden, bias=not batch_norm))
        if batch_norm:
            layers.append(BatchNorm1d(hidden))
        layers.append(nn.Sigmoid())
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    for module in layers:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return nn.Sequential(*layers)


@dataclass
class TrainResult:
    test_accuracy: float
    final_loss: float


def train_classifier(
    model: nn.Module,
    data: Split,
    steps: int,
    batch_size: int = 60,
    lr: float = 0.5,
    seed: int = 0,
    progress: bool = False,
    label: str = "",
) -> TrainResult:
    """Plain SGD on random mini-batches (sampled with a seeded generator); test accuracy at the
    end."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss = torch.tensor(float("nan"))  # reported as is when steps == 0
    for _ in tqdm(range(steps), desc=label, disable=not progress, leave=False):
        batch = torch.randint(len(data.train_y), (batch_size,), generator=generator)
        loss = loss_fn(model(data.train_x[batch]), data.train_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return TrainResult(accuracy(model, data.test_x, data.test_y), loss.item())


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of correct argmax predictions, in eval mode (BN uses its running statistics)."""
    was_training = model.training
    model.eval()
    correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train(was_training)
    return correct
