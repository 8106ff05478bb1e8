import torch

import bnlab
from bnlab.data import load_digits
from bnlab.lab.mlp import accuracy, sigmoid_mlp, train_classifier


def test_architecture_follows_the_paper():
    plain, with_bn = sigmoid_mlp(64), sigmoid_mlp(64, batch_norm=True)
    assert [type(m).__name__ for m in with_bn] == ["Linear", "BatchNorm1d", "Sigmoid"] * 3 + [
        "Linear"
    ]
    assert all(
        isinstance(m, bnlab.nn.BatchNorm1d) for m in with_bn if "BatchNorm" in type(m).__name__
    )
    assert with_bn[0].bias is None and plain[0].bias is not None  # beta replaces the bias
    assert sum(isinstance(m, torch.nn.Linear) and m.out_features == 100 for m in plain) == 3


def test_bn_trains_where_the_plain_sigmoid_net_stalls():
    """The demo's claim at a tenth of its budget: BN learns fast at a rate where the plain net
    stalls."""
    data = load_digits()
    results = {}
    for batch_norm in (False, True):
        torch.manual_seed(0)
        model = sigmoid_mlp(data.num_features, data.num_classes, batch_norm=batch_norm)
        results[batch_norm] = train_classifier(model, data, steps=300, lr=0.5).test_accuracy
    assert results[True] > 0.9
    assert results[False] < 0.5


def test_accuracy_restores_the_mode():
    model = sigmoid_mlp(4, 3, batch_norm=True).train()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    assert 0.0 <= accuracy(model, x, y) <= 1.0
    assert model.training
