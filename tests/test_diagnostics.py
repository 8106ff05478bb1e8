import math

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.diagnostics import ActivationPercentiles, band_drift


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3))


def test_records_the_percentiles_of_one_unit_of_the_input():
    model = _net().eval()
    x = torch.randn(50, 4)
    tracker = ActivationPercentiles(model[1], unit=2, percentiles=(15, 50, 85))
    model(x[:20])
    model(x[20:])  # two forwards since the last record are pooled
    entry = tracker.record(step=7)
    expected = np.percentile(model[0](x)[:, 2].detach().double().numpy(), [15, 50, 85])
    assert entry["step"] == 7
    assert [entry["p15"], entry["p50"], entry["p85"]] == pytest.approx(expected, abs=1e-6)
    assert tracker.history == [entry]
    with pytest.raises(RuntimeError, match="nothing captured"):
        tracker.record(8)  # the buffer was cleared


def test_output_capture_all_units_and_channels():
    model = _net().eval().requires_grad_(False)
    x = torch.randn(30, 4)
    out = ActivationPercentiles(model[1], unit=None, percentiles=(50,), capture="output")
    model(x)
    assert out.record(0)["p50"] == pytest.approx(
        float(torch.sigmoid(model[0](x)).median()), abs=0.05
    )
    conv = nn.Conv2d(1, 3, 3).eval()
    channel = ActivationPercentiles(conv, unit=1, percentiles=(0, 100), capture="output")
    with torch.no_grad():
        y = conv(torch.randn(2, 1, 5, 5))
    entry = channel.record(0)
    assert entry["p0"] == pytest.approx(float(y[:, 1].min())) and entry["p100"] == pytest.approx(
        float(y[:, 1].max())
    )


def test_training_forwards_are_skipped_by_default_and_the_hook_detaches():
    model = _net()
    tracker = ActivationPercentiles(model[1], unit=0)
    model.train()(torch.randn(8, 4))
    assert tracker.pending() == 0
    model.eval()(torch.randn(8, 4))
    assert tracker.pending() == 8
    every = ActivationPercentiles(model[1], unit=0, training=None)
    model.train()(torch.randn(8, 4))
    assert every.pending() == 8
    tracker.remove()
    tracker.remove()  # idempotent
    assert not tracker.attached and not model[1]._forward_hooks.keys() - {id(every)} - set(
        model[1]._forward_hooks
    )
    model.eval()(torch.randn(8, 4))
    assert tracker.pending() == 0
    with ActivationPercentiles(model[1], unit=0) as scoped:
        assert scoped.attached
    assert not scoped.attached
    every.remove()
    assert len(model[1]._forward_hooks) == 0


def test_state_dict_round_trip_and_bad_arguments():
    model = _net().eval()
    a = ActivationPercentiles(model[1], unit=1)
    model(torch.randn(10, 4))
    a.record(3)
    b = ActivationPercentiles(model[1], unit=1)
    b.load_state_dict(a.state_dict())
    assert b.history == a.history
    with pytest.raises(ValueError, match="capture"):
        ActivationPercentiles(model[1], capture="grad")
    with pytest.raises(ValueError, match="percentiles"):
        ActivationPercentiles(model[1], percentiles=(50, 101))
    bad = ActivationPercentiles(model[1], unit=99)
    with pytest.raises(ValueError, match="out of range"):
        model(torch.randn(2, 4))
    bad.remove()


def test_non_finite_values_are_dropped():
    lin = nn.Identity()
    t = ActivationPercentiles(lin, unit=0, percentiles=(50,), training=None)
    lin(torch.tensor([[1.0], [float("nan")], [3.0]]))
    assert t.record(0)["p50"] == 2.0
    lin(torch.tensor([[float("inf")]]))
    assert math.isnan(t.record(1)["p50"])


def test_band_drift():
    history = [
        {"step": s, "p15": -w, "p50": m, "p85": w}
        for s, m, w in [(0, 0.0, 1.0), (10, 0.5, 2.0), (20, -0.5, 1.5), (30, 1.0, 3.0)]
    ]
    d = band_drift(history)
    assert d["median_change"] == 1.0 and d["median_range"] == 1.5
    assert d["spread_first"] == 2.0 and d["spread_last"] == 6.0 and d["spread_range"] == 4.0
    assert d["spread_ratio"] == 3.0
    late = band_drift(history, start_step=15)
    assert late["first_step"] == 20 and late["median_change"] == 1.5
    with pytest.raises(ValueError):
        band_drift(history, start_step=99)
