"""bnlab.nn.BNLSTM / BNLSTMCell against a float64 reference written from the equations (Cooijmans
et al. 2016, section 3)."""

import io

import pytest
import torch

import bnlab
from bnlab.nn.bnlstm import BNLSTM, BNLSTMCell
from tolerances import GRADIENT, assert_close

D = torch.float64
EPS = 1e-5


# ------------------------------------------------------------------------------------------
# reference: plain torch ops, autograd
# ------------------------------------------------------------------------------------------


def ref_bn(x, gamma, beta, valid, eps=EPS, stats=None):
    """Per-feature BN of x (N, F) over the valid rows; stats=(mean, var) normalizes with those."""
    if stats is None:
        xs = x[valid]
        mean, var = xs.mean(0), xs.var(0, unbiased=False)
    else:
        mean, var = stats
    y = (x - mean) / torch.sqrt(var + eps) * gamma
    return y if beta is None else y + beta


def ref_layer(cell, x, lengths, h, c, record=None, eval_stats=False):
    """One layer, step by step; record collects the pre-normalization values per step."""
    T, N, _ = x.shape
    outs = []
    for t in range(T):
        valid = lengths > t
        r = min(t, cell.max_length - 1)
        st = (
            (
                lambda w: (
                    getattr(cell, f"running_mean_{w}")[r],
                    getattr(cell, f"running_var_{w}")[r],
                )
            )
            if eval_stats
            else (lambda w: None)
        )
        xt = torch.where(valid[:, None], x[t], torch.zeros_like(x[t]))
        ux, uh = xt @ cell.weight_ih.t(), h @ cell.weight_hh.t()
        gates = (
            ref_bn(uh, cell.weight_h, None, valid, cell.eps, st("h"))
            + ref_bn(ux, cell.weight_x, None, valid, cell.eps, st("x"))
            + cell.bias
        )
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(
            ref_bn(c_new, cell.weight_c, cell.bias_c, valid, cell.eps, st("c"))
        )
        if record is not None:
            record.append((ux[valid], uh[valid], c_new[valid]))
        v = valid[:, None]
        h, c = torch.where(v, h_new, h), torch.where(v, c_new, c)
        outs.append(torch.where(v, h_new, torch.zeros_like(h_new)))
    return torch.stack(outs), h, c


def ref_lstm(model, x, lengths=None, hx=None, record=None, eval_stats=False):
    T, N, _ = x.shape
    lengths = torch.full((N,), T) if lengths is None else lengths
    H = model.hidden_size
    hs, cs = [], []
    for k, cell in enumerate(model.cells):
        h0 = x.new_zeros(N, H) if hx is None else hx[0][k]
        c0 = x.new_zeros(N, H) if hx is None else hx[1][k]
        x, h, c = ref_layer(
            cell, x, lengths, h0, c0, None if record is None or k else record, eval_stats
        )
        hs.append(h)
        cs.append(c)
    return x, (torch.stack(hs), torch.stack(cs))


def randomize(model, seed=0):
    """Non-trivial parameters (gammas away from 0.1, non-zero biases) so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make(T=5, N=4, I=3, H=4, L=2, seed=0, **kw):
    torch.manual_seed(seed)
    model = randomize(BNLSTM(I, H, L, max_length=kw.pop("max_length", T), dtype=D, **kw), seed)
    x = torch.randn(T, N, I, dtype=D)
    return model, x


# ------------------------------------------------------------------------------------------
# values and gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [None, [5, 3, 5, 2]])
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("I", [3, 6])  # input statistics via the (I, I) covariance (I <= N) or not
def test_matches_reference_outputs_and_gradients(lengths, with_hx, I):
    model, x = make(I=I)
    lengths = None if lengths is None else torch.tensor(lengths)
    g = torch.Generator().manual_seed(1)
    hx = None
    if with_hx:
        hx = tuple(torch.randn(2, 4, 4, generator=g, dtype=D) for _ in range(2))
    dout = torch.randn(5, 4, 4, generator=g, dtype=D)
    dh, dc = (torch.randn(2, 4, 4, generator=g, dtype=D) for _ in range(2))

    def run(fn):
        xx = x.clone().requires_grad_()
        hh = None if hx is None else tuple(s.clone().requires_grad_() for s in hx)
        out, (h, c) = fn(xx, lengths, hh)
        ((out * dout).sum() + (h * dh).sum() + (c * dc).sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()] + [xx.grad]
        grads += [] if hh is None else [s.grad for s in hh]
        model.zero_grad()
        return (out, h, c), grads

    ours, ours_g = run(lambda xx, ln, hh: model(xx, hh, lengths=ln))
    ref, ref_g = run(lambda xx, ln, hh: ref_lstm(model, xx, ln, hh))
    for a, b in zip(ours, ref):
        assert_close(a, b, D)
    names = [n for n, _ in model.named_parameters()] + ["input", "h0", "c0"]
    for name, a, b in zip(names, ours_g, ref_g):
        assert_close(a, b, D, GRADIENT, msg=name)
    if lengths is not None:  # padding outputs are exactly zero
        for n, ln in enumerate(lengths.tolist()):
            assert (ours[0][ln:, n] == 0).all()


@pytest.mark.parametrize("lengths", [None, [6, 5, 6, 4]])
def test_batch_constant_prefix(lengths):
    """Leading steps equal for every sequence (MNIST's blank first pixels): values, statistics and
    parameter gradients as the reference's; no overflow over a long prefix."""
    model, x = make(T=6, N=4, L=1, momentum=1.0, eps=0.1)  # eps 0.1: the reference's amplified
    x = x.clone()  # rounding noise stays small
    x[:3] = x[:3, :1]  # steps 0..2: the same input in every sequence
    lengths = None if lengths is None else torch.tensor(lengths)
    ref = BNLSTM(3, 4, 1, max_length=6, dtype=D, momentum=1.0, eps=0.1)
    ref.load_state_dict(model.state_dict())
    out, (h, c) = model(x, lengths=lengths)
    ref_out, (rh, rc) = ref_lstm(ref, x, lengths)
    ((out**2).sum() + h.sum() + c.sum()).backward()
    ((ref_out**2).sum() + rh.sum() + rc.sum()).backward()
    for a, b in ((out, ref_out), (h, rh), (c, rc)):
        assert_close(a, b, D)
    record = []
    with torch.no_grad():
        ref_lstm(ref, x, lengths, record=record)
    cell = model.cells[0]
    for t, values in enumerate(record):
        for which, v in zip("xhc", values):
            torch.testing.assert_close(
                getattr(cell, f"running_mean_{which}")[t], v.mean(0), atol=1e-10, rtol=0
            )
            torch.testing.assert_close(
                getattr(cell, f"running_var_{which}")[t], v.var(0), atol=1e-10, rtol=0
            )
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, D, GRADIENT, msg=name)
    # float32 over 300 blank steps (gamma 0.1, eps 1e-5): finite gradients
    torch.manual_seed(0)
    model = BNLSTM(1, 8, max_length=320)
    x = torch.cat([torch.zeros(300, 16, 1), torch.rand(20, 16, 1)])
    out, _ = model(x)
    out[-1].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.cells[0].weight_hh.grad.abs().sum() > 0


def test_eval_features_of_variance_zero_give_the_shift():
    """A feature constant in every training batch (running variance exactly 0) normalizes to 0 in
    eval as it did in training, whatever its running mean: eval reproduces training there."""
    model, x = make(T=5, N=4, L=1, momentum=1.0)
    x = x.clone()
    x[:2] = 0.0  # two blank steps
    train_out, _ = model(x)
    cell = model.cells[0]
    for which in "xhc":
        assert (getattr(cell, f"running_var_{which}")[:2] == 0).all()
    model.eval()
    with torch.no_grad():
        for (
            which
        ) in "xhc":  # a lagging running mean would otherwise be amplified by gamma / sqrt(eps)
            getattr(cell, f"running_mean_{which}")[:2] += 0.01
    eval_out, _ = model(x)
    assert torch.equal(eval_out[:2], train_out[:2])
    assert not torch.allclose(
        eval_out[2:], train_out[2:]
    )  # elsewhere: running, not batch, statistics


def test_gradcheck_tiny():
    torch.manual_seed(0)
    model = randomize(BNLSTM(2, 2, 1, max_length=3, dtype=D))
    params = dict(model.named_parameters())
    names = list(params)
    x = torch.randn(3, 3, 2, dtype=D, requires_grad=True)
    h0 = torch.randn(1, 3, 2, dtype=D, requires_grad=True)
    c0 = torch.randn(1, 3, 2, dtype=D, requires_grad=True)
    lengths = torch.tensor([3, 2, 3])

    def f(x, h0, c0, *ps):
        out, (h, c) = torch.func.functional_call(
            model, dict(zip(names, ps)), (x, (h0, c0)), {"lengths": lengths}
        )
        return out, h, c

    ps = tuple(p.detach().clone().requires_grad_() for p in params.values())
    assert torch.autograd.gradcheck(f, (x, h0, c0, *ps), eps=1e-6, atol=1e-7)


def test_sequence_path_equals_single_steps():
    """forward_sequence (batched input BN) == the cell's one-step forward, values and statistics."""
    torch.manual_seed(0)
    a = randomize(BNLSTMCell(3, 4, 6, dtype=D))
    b = BNLSTMCell(3, 4, 6, dtype=D)
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 5, 3, dtype=D)
    lengths = torch.tensor([6, 4, 6, 2, 5])
    out, (h, c) = a.forward_sequence(x, None, lengths)
    state = None
    for t in range(6):
        state = b(x[t], state, t, mask=lengths > t)
    assert_close(h, state[0], D)
    assert_close(c, state[1], D)
    for key, v in a.state_dict().items():
        if v.dtype.is_floating_point:
            assert_close(v, b.state_dict()[key], v.dtype, msg=key)
        else:
            assert torch.equal(v, b.state_dict()[key]), key


# ------------------------------------------------------------------------------------------
# per-step statistics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [None, [5, 3, 5, 2]])
def test_per_step_running_statistics(lengths):
    """momentum 1: running_*[t] is step t's batch statistic (unbiased var) over the valid rows."""
    model, x = make(L=1, momentum=1.0, max_length=7)
    ln = None if lengths is None else torch.tensor(lengths)
    model(x, lengths=ln)
    record = []
    with torch.no_grad():
        ref_lstm(model, x, ln, record=record)
    cell = model.cells[0]
    assert len(record) == 5
    for t, values in enumerate(record):
        for which, v in zip("xhc", values):
            assert_close(getattr(cell, f"running_mean_{which}")[t], v.mean(0), D, msg=f"{which}{t}")
            assert_close(getattr(cell, f"running_var_{which}")[t], v.var(0, unbiased=True), D)
    for which in "xhc":  # untouched rows past the sequence
        assert (getattr(cell, f"running_mean_{which}")[5:] == 0).all()
        assert (getattr(cell, f"running_var_{which}")[5:] == 1).all()
    assert int(cell.num_batches_tracked) == 1


def test_running_statistics_ema():
    model, x = make(L=1, momentum=0.3)
    model(x)
    record = []
    with torch.no_grad():
        ref_lstm(model, x, record=record)
    cell = model.cells[0]
    assert_close(cell.running_mean_x[2], 0.3 * record[2][0].mean(0), D)
    assert_close(cell.running_var_c[4], 0.7 + 0.3 * record[4][2].var(0), D)


def test_eval_uses_running_statistics_and_reuses_last_step():
    model, x = make(T=3, max_length=3)
    for _ in range(3):
        model(x)
    model.eval()
    long = torch.randn(6, 4, 3, dtype=D)
    out, (h, c) = model(long)
    ref_out, (rh, rc) = ref_lstm(model, long, eval_stats=True)  # rows min(t, max_length - 1)
    assert_close(out, ref_out, D)
    assert_close(h, rh, D)
    # the cell's step t >= max_length is its step max_length - 1
    cell = model.cells[0]
    s = (torch.randn(4, 4, dtype=D), torch.randn(4, 4, dtype=D))
    for a, b in zip(cell(long[0], s, t=5), cell(long[0], s, t=2)):
        assert torch.equal(a, b)
    with torch.no_grad():  # and the statistics matter: other row -> other output
        assert not torch.allclose(cell(long[0], s, t=0)[0], cell(long[0], s, t=2)[0])


def test_training_longer_than_max_length_raises():
    model, x = make(T=5, max_length=4)
    with pytest.raises(ValueError, match="max_length = 4"):
        model(x)
    model(x, lengths=torch.tensor([4, 4, 3, 2]))  # padded to 5 but no sequence beyond 4: fine


# ------------------------------------------------------------------------------------------
# variable lengths
# ------------------------------------------------------------------------------------------


def test_lengths_eval_match_each_sequence_alone():
    """In eval, a padded batch gives each sequence's own outputs and last state (h_n, c_n)."""
    model, x = make(T=6, N=4)
    model(x)  # some running statistics
    model.eval()
    lengths = torch.tensor([6, 2, 4, 1])
    x = x.clone()
    x[2:, 1] = float("nan")  # padding never leaks in
    out, (h, c) = model(x, lengths=lengths)
    for n, ln in enumerate(lengths.tolist()):
        o1, (h1, c1) = model(x[:ln, n : n + 1])
        assert_close(out[:ln, n : n + 1], o1, D)
        assert (out[ln:, n] == 0).all()
        assert_close(h[:, n : n + 1], h1, D)
        assert_close(c[:, n : n + 1], c1, D)


def test_training_statistics_exclude_finished_sequences():
    """Changing a finished sequence's padding or its values after its end changes nothing."""
    model, x = make(T=5, N=4, momentum=1.0)
    lengths = torch.tensor([5, 2, 5, 3])
    out1, _ = model(x, lengths=lengths)
    stats1 = {k: v.clone() for k, v in model.state_dict().items()}
    x2 = x.clone()
    x2[2:, 1] = 100.0
    x2[3:, 3] = -7.0
    out2, _ = model(x2, lengths=lengths)
    assert torch.equal(out1, out2)
    for k, v in model.state_dict().items():
        if "num_batches" not in k:
            assert torch.equal(v, stats1[k]), k


@pytest.mark.parametrize("I", [3, 6])
def test_eval_matches_reference(I):
    """Eval (running statistics, both input-term paths) against the reference."""
    model, x = make(I=I)
    model(x)
    model.eval()
    lengths = torch.tensor([5, 3, 5, 2])
    out, (h, c) = model(x, lengths=lengths)
    ref_out, (rh, rc) = ref_lstm(model, x, lengths, eval_stats=True)
    for a, b in ((out, ref_out), (h, rh), (c, rc)):
        assert_close(a, b, D)


def test_mask_equals_lengths():
    model, x = make(T=5, N=4)
    lengths = torch.tensor([5, 3, 5, 2])
    mask = torch.arange(5).unsqueeze(1) < lengths  # (T, N)
    a, (ha, ca) = model(x, lengths=lengths)
    b, (hb, cb) = model(x, mask=mask)
    assert torch.equal(a, b) and torch.equal(ha, hb) and torch.equal(ca, cb)
    bf = BNLSTM(3, 4, 2, max_length=5, batch_first=True, dtype=D)
    bf.load_state_dict(model.state_dict())
    bf.eval(), model.eval()
    assert_close(
        bf(x.transpose(0, 1), mask=mask.t())[0].transpose(0, 1), model(x, lengths=lengths)[0], D
    )
    bad = mask.clone()
    bad[1, 0] = False  # a hole in sequence 0
    with pytest.raises(ValueError, match=r"prefix of each sequence.*\[0\]"):
        model(x, mask=bad)
    with pytest.raises(ValueError, match=r"bool mask of shape \(T, N\) = \(5, 4\)"):
        model(x, mask=mask.t())
    with pytest.raises(ValueError, match="not both"):
        model(x, lengths=lengths, mask=mask)


def test_lengths_errors():
    model, x = make(T=4, N=3)
    with pytest.raises(ValueError, match="zero-length"):
        model(x, lengths=torch.tensor([4, 0, 2]))
    with pytest.raises(ValueError, match="<= the input's T"):
        model(x, lengths=torch.tensor([5, 1, 2]))
    with pytest.raises(ValueError, match="at least 2 valid"):
        model(x, lengths=torch.tensor([4, 2, 2]))  # steps 2, 3 have one sequence in training
    with pytest.raises(ValueError, match="integer lengths of shape \\(3,\\)"):
        model(x, lengths=torch.tensor([4.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="at least 2 valid"):  # the one-step API too
        model.cells[0](x[0], None, 0, mask=torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match="non-empty"):
        model(x[:0])
    model.eval()
    model(x, lengths=torch.tensor([4, 2, 2]))  # fine in eval


# ------------------------------------------------------------------------------------------
# API
# ------------------------------------------------------------------------------------------


def test_shape_errors_name_expected_and_got():
    model, x = make(T=4, N=3, I=3, H=4, L=2)
    with pytest.raises(ValueError, match=r"input_size = 3, got \(4, 3, 5\)"):
        model(torch.randn(4, 3, 5, dtype=D))
    good = torch.zeros(2, 3, 4, dtype=D)
    with pytest.raises(ValueError, match=r"h0 of shape .* \(2, 3, 4\), got \(1, 3, 4\)"):
        model(x, (torch.zeros(1, 3, 4, dtype=D), good))
    with pytest.raises(ValueError, match=r"c0 of shape .* \(2, 3, 4\), got \(2, 3, 5\)"):
        model(x, (good, torch.zeros(2, 3, 5, dtype=D)))
    with pytest.raises(ValueError, match="input_size"):
        BNLSTMCell(3, 4, 5)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"input_size = 3, got \(5, 2, 4\)"):
        BNLSTMCell(3, 4, 5).forward_sequence(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match=r"h of shape \(2, 4\), got \(2, 3\)"):
        BNLSTMCell(3, 4, 5)(torch.randn(2, 3), (torch.zeros(2, 3), torch.zeros(2, 4)))


def test_init_and_parameters():
    cell = BNLSTMCell(5, 3, 7, forget_bias=1.0)
    assert torch.allclose(cell.weight_hh, torch.eye(3).repeat(4, 1))
    w = cell.weight_ih  # (12, 5): orthonormal columns
    assert torch.allclose(w.t() @ w, torch.eye(5), atol=1e-5)
    for p in (cell.weight_x, cell.weight_h, cell.weight_c):
        assert (p == 0.1).all()
    assert (cell.bias_c == 0).all()
    assert (cell.bias[3:6] == 1).all() and (cell.bias[:3] == 0).all() and (cell.bias[6:] == 0).all()
    assert cell.running_mean_x.shape == (7, 12) and cell.running_var_c.shape == (7, 3)
    assert (BNLSTMCell(2, 2, 2, gamma_init=0.5).weight_h == 0.5).all()
    assert BNLSTM(2, 3, max_length=4).cells[0].bias.abs().sum() == 0  # default b = 0


def test_state_dict_round_trip():
    model, x = make()
    model(x)
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = BNLSTM(3, 4, 2, max_length=5, dtype=D)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    other.eval()
    a, (ha, ca) = model(x)
    b, (hb, cb) = other(x)
    assert torch.equal(a, b) and torch.equal(ha, hb) and torch.equal(ca, cb)
    keys = set(model.state_dict())
    assert "cells.0.running_mean_x" in keys and "cells.1.num_batches_tracked" in keys


def test_batch_first():
    model, x = make()
    other = BNLSTM(3, 4, 2, max_length=5, batch_first=True, dtype=D)
    other.load_state_dict(model.state_dict())
    lengths = torch.tensor([5, 3, 5, 2])
    a, (ha, ca) = model(x, lengths=lengths)
    b, (hb, cb) = other(x.transpose(0, 1), lengths=lengths)
    assert_close(b.transpose(0, 1), a, D)
    assert_close(hb, ha, D)
    assert_close(cb, ca, D)


def test_dropout_eval_deterministic_training_not():
    model, x = make(L=2, dropout=0.5)
    torch.manual_seed(1)
    t1, _ = model(x)
    t2, _ = model(x)
    assert not torch.allclose(t1, t2)
    model.eval()
    e1, _ = model(x)
    e2, _ = model(x)
    assert torch.equal(e1, e2)


def test_float32_and_exported_names():
    assert bnlab.nn.BNLSTM is BNLSTM and bnlab.nn.BNLSTMCell is BNLSTMCell
    torch.manual_seed(0)
    model = BNLSTM(3, 4, 2, max_length=5)
    out, (h, c) = model(torch.randn(5, 4, 3))
    assert out.dtype == torch.float32 and h.shape == (2, 4, 4)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------
# population statistics (bnlab.inference), per time step
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance", ["batch", "population"])
def test_population_statistics_per_step(variance):
    """Every step's running statistics of every layer become Algorithm 2's averages over the
    batches of the values that step normalized (valid rows only), as computed directly."""
    from bnlab.inference import population_statistics

    model, _ = make(T=6, N=4, L=2, max_length=8)
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(6, 5, 3, generator=g, dtype=D), torch.tensor([6, 4, 6, 2, 5])),
        (torch.randn(5, 4, 3, generator=g, dtype=D), None),
        (torch.randn(6, 3, 3, generator=g, dtype=D), torch.tensor([3, 6, 6])),
    ]
    batches[1][0][:2] = batches[1][0][:2, :1]  # two steps equal in every sequence
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = population_statistics(model, [(x, None, ln) for x, ln in batches], variance=variance)
    # the direct computation: each layer's pre-normalization values per step, batch by batch
    values = {}  # (layer, which, t) -> [values of each batch]
    with torch.no_grad():
        for x, ln in batches:
            lengths = torch.full((x.shape[1],), x.shape[0]) if ln is None else ln
            h = x
            for k, cell in enumerate(model.cells):
                record = []
                zeros = x.new_zeros(x.shape[1], 4)
                h, _, _ = ref_layer(cell, h, lengths, zeros, zeros, record)
                for t, per_term in enumerate(record):
                    for which, v in zip("xhc", per_term):
                        values.setdefault((k, which, t), []).append(v)
    for (k, which, t), vs in values.items():
        m = torch.tensor([float(len(v)) for v in vs], dtype=D)
        means = torch.stack([v.mean(0) for v in vs])
        expect_mean = (m[:, None] * means).sum(0) / m.sum()
        if variance == "batch":
            expect_var = sum(len(v) * v.var(0, unbiased=False) for v in vs) / (m - 1).sum()
        else:
            expect_var = torch.cat(vs).var(0)
        cell = model.cells[k]
        torch.testing.assert_close(
            getattr(cell, f"running_mean_{which}")[t],
            expect_mean,
            atol=1e-12,
            rtol=1e-10,
            msg=f"layer {k} {which} step {t}",
        )
        torch.testing.assert_close(
            getattr(cell, f"running_var_{which}")[t],
            expect_var,
            atol=1e-12,
            rtol=1e-10,
            msg=f"layer {k} {which} step {t}",
        )
    # steps 6, 7 (never reached) keep their statistics, and the report says so
    state = model.state_dict()
    for k in range(2):
        for which in "xhc":
            key = f"cells.{k}.running_mean_{which}"
            assert torch.equal(state[key][6:], before[key][6:])
            assert "steps 6..7" in report.untouched[f"cells.{k}.{which}"]
        assert (
            report.values[f"cells.{k}.x"] == 2 + 2
        )  # the fewest: step 5, 2 sequences in batches 0 and 2
        assert torch.equal(
            state[f"cells.{k}.num_batches_tracked"], before[f"cells.{k}.num_batches_tracked"]
        )
        assert model.cells[k].observer is None and model.training
    assert report.batches == 3 and report.skipped == 0


def test_population_statistics_of_one_batch_are_the_eval_mode_values():
    """Run as one batch, the statistics are those every step normalized with (the stored variance
    is the unbiased one: times (n-1)/n it is the batch's), so eval mode reproduces training mode's
    outputs on that batch: each step's statistics describe the values eval mode computes.
    Algorithm 2's average over parts of the same batch describes values computed with each part's
    own statistics at the earlier steps, and eval mode departs from them (what the seq-mnist lab's
    population_joint is about)."""
    import copy

    from bnlab.inference import population_statistics

    model, _ = make(T=6, N=4, L=2)
    n = 4000
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, n, 3, generator=g, dtype=D)
    x[:2] = 0  # blank leading steps, as MNIST's first rows
    x[2] *= torch.rand(n, 1, generator=g, dtype=D) < 0.05  # a sparse step: few sequences vary
    with torch.no_grad():
        trained = copy.deepcopy(model).train()(x)[0]
    errors = {}
    for joint in (True, False):
        m = copy.deepcopy(model)
        population_statistics(m, [x] if joint else list(x.split(100, dim=1)))
        with torch.no_grad():
            for cell in m.cells:
                for which in "xhc":
                    getattr(cell, f"running_var_{which}").mul_((n - 1) / n)
            errors[joint] = float((m.eval()(x)[0] - trained).abs().max())
    assert errors[True] < 1e-8
    assert errors[False] > 1e-2
