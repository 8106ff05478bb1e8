"""bnlab.distributed / SyncBatchNorm across gloo processes against one process on the whole batch.

The multi-process tests start their ranks as subprocesses running this file as a script (``python
test_distributed.py SCENARIO RANK WORLD STORE OUTDIR``), rendezvous through a file store in
tmp_path, and write their results there; the test process computes the single-process reference and
compares. Every launch has a deadline after which the ranks are killed and the test fails: nothing
can hang. One launch per world size runs the whole case grid, so each case's comparison is its own
test.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

import bnlab
from bnlab.nn import BatchNorm2d, SyncBatchNorm

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
STEPS = 3  # running statistics and their momentum matter over several steps
WORKER_TIMEOUT = 20.0  # seconds a rank waits at an exchange in the grid runs (none should wait)
LAUNCH_DEADLINE = 90.0  # seconds before the ranks of one launch are killed
# (atol = rtol) for outputs, input gradients and running statistics, and for dweight/dbias: a
# float32 dweight sums ~100 products with cancellation, summed per rank and then across ranks, so
# either side's own rounding reaches a few 1e-6 there (seen: up to 4.8e-6)
TOL = {torch.float64: 1e-10, torch.float32: 1e-6, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 4e-2}
BATCHES = {2: (4, 7), 3: (5, 0, 3)}  # rows per rank; an empty rank included


def test_world_size_without_process_group_is_one():
    assert bnlab.distributed.world_size() == 1


# --------------------------------------------------------------------------------------------
# sync_batch_norm in one process (no process group)
# --------------------------------------------------------------------------------------------


def _tensors(shape, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w, b = (
        torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
        torch.randn(c, generator=g, dtype=torch.float64),
    )
    return x, w, b


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    "shape,layout", [((7, 4), "contiguous"), ((3, 4, 5, 2), "channels_last")], ids=str
)
def test_functional_without_group_matches_batch_norm(shape, layout, momentum):
    x, w, b = _tensors(shape, layout=layout)
    state = [
        [
            torch.zeros(shape[1], dtype=torch.float64),
            torch.ones(shape[1], dtype=torch.float64),
            torch.tensor(0),
        ]
        for _ in range(2)
    ]
    outs = []
    for fn, (rm, rv, nbt) in zip((bnlab.distributed.sync_batch_norm, bnlab.batch_norm), state):
        xi = x.clone(memory_format=torch.preserve_format).requires_grad_()
        out = fn(xi, rm, rv, w, b, True, momentum, num_batches_tracked=nbt)
        out.backward(torch.cos(out.detach()))
        outs.append((out, xi.grad))
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
        assert a.stride() == e.stride()
    for a, e in zip(*state):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)


def test_functional_eval_is_batch_norm():
    x, w, b = _tensors((5, 3, 4))
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    torch.testing.assert_close(
        bnlab.distributed.sync_batch_norm(x, rm, rv, w, b),
        bnlab.batch_norm(x, rm, rv, w, b),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_functional_gradcheck(masked):
    """The hand-written backward is the derivative of the forward, padding outputs included."""
    x, w, b = _tensors((4, 3, 5), seed=2)
    mask = (torch.rand(4, 5, generator=torch.Generator().manual_seed(3)) > 0.4) if masked else None

    def fn(x, w, b):
        return bnlab.distributed.sync_batch_norm(x, None, None, w, b, True, mask=mask)

    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"training": False}, ValueError, "needs running_mean and running_var"),
        (
            {"training": True, "momentum": None, "running": True},
            ValueError,
            "needs num_batches_tracked",
        ),
        ({"training": True, "eps": 0.0}, ValueError, "eps must be > 0"),
        ({"training": True, "momentum": 2.0}, ValueError, "momentum must be in"),
        ({"training": True, "weight": torch.ones(4)}, ValueError, "weight has shape"),
    ],
)
def test_functional_argument_errors(kwargs, error, match):
    kwargs = dict(kwargs)
    running = (torch.zeros(3), torch.ones(3)) if kwargs.pop("running", False) else (None, None)
    with pytest.raises(error, match=match):
        bnlab.distributed.sync_batch_norm(torch.randn(4, 3), *running, **kwargs)


# --------------------------------------------------------------------------------------------
# the case grid, shared by the ranks (which run it) and the test process (which checks it)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    rest: tuple  # (C, *spatial)
    dtype: torch.dtype
    momentum: Optional[float] = 0.1
    layout: str = "contiguous"  # or "channels_last" (4-D)
    masked: str = ""  # "valid": dy is 0 at padding; "padding": dy everywhere
    affine: bool = True
    batches: Optional[dict] = None  # world -> rows per rank, overriding BATCHES

    def sizes(self, world: int) -> tuple:
        return (self.batches or BATCHES)[world]


def _grid() -> list[Case]:
    cases = []
    dtypes = {torch.float32: "f32", torch.float64: "f64"}
    for rest, layout, label in [
        ((5,), "contiguous", "2d"),
        ((3, 4, 5), "contiguous", "4d"),
        ((3, 4, 5), "channels_last", "4d-cl"),
    ]:
        for dtype, dname in dtypes.items():
            for momentum in (0.1, None):
                cases.append(Case(f"{label}-{dname}-m{momentum}", rest, dtype, momentum, layout))
    cases += [
        Case("3d-f64-noaffine", (2, 3, 2, 2), torch.float64, affine=False),
        Case("2d-bf16", (5,), torch.bfloat16),
        Case("masked-valid-f64", (4, 6), torch.float64, masked="valid"),
        Case("masked-valid-f32", (4, 6), torch.float32, None, masked="valid"),
        Case("masked-padding-f64", (4, 6), torch.float64, masked="padding"),
        Case("one-row-per-rank", (5,), torch.float64, batches={2: (1, 1), 3: (1, 1, 0)}),
        Case("one-value-in-all", (5,), torch.float64, batches={2: (1, 0), 3: (0, 1, 0)}),
        Case("all-empty", (3, 2, 2), torch.float64, batches={2: (0, 0), 3: (0, 0, 0)}),
    ]
    return cases


CASES = {case.name: case for case in _grid()}


def _seed(case: Case, world: int, step: int) -> int:
    return zlib.crc32(f"{case.name}/{world}/{step}".encode())  # hash() differs between processes


def case_data(case: Case, world: int, step: int):
    """The whole batch (every rank's rows, in rank order): x, dy, mask (or None)."""
    g = torch.Generator().manual_seed(_seed(case, world, step))
    shape = (sum(case.sizes(world)), *case.rest)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = None
    if case.masked:
        mask = torch.rand((shape[0], *shape[2:]), generator=g) > 0.35
        if case.masked == "valid":
            dy = dy * mask.unsqueeze(1)
    x, dy = x.to(case.dtype), dy.to(case.dtype)
    if case.layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x, dy, mask


def make_module(cls, case: Case, **kwargs):
    """A batch-norm layer in a non-trivial state, the same for every rank and the reference."""
    c = case.rest[0]
    bn = cls(c, momentum=case.momentum, affine=case.affine, dtype=case.dtype, **kwargs)
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    with torch.no_grad():
        if case.affine:
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(3)
    return bn


def run_steps(bn, case: Case, world: int, rows=None):
    """Train-mode steps of ``bn`` on the rows ``rows`` (a slice) of each step's whole batch."""
    steps, rows = [], rows or slice(None)
    for step in range(STEPS):
        x, dy, mask = case_data(case, world, step)
        x = x[rows].clone(memory_format=torch.preserve_format).requires_grad_()
        try:
            out = bn(x) if mask is None else bn(x, mask[rows])
        except ValueError as error:
            steps.append({"error": str(error)})
            continue
        out.backward(dy[rows])
        steps.append(
            {
                "out": out.detach(),
                "dx": x.grad,
                "dw": None if bn.weight is None else bn.weight.grad.clone(),
                "db": None if bn.bias is None else bn.bias.grad.clone(),
                **{name: buf.clone() for name, buf in bn.named_buffers()},
            }
        )
        bn.zero_grad()
    return steps


# --------------------------------------------------------------------------------------------
# launching ranks
# --------------------------------------------------------------------------------------------


def launch(scenario: str, world: int, directory: Path, deadline: float = LAUNCH_DEADLINE):
    """Run ``scenario`` on ``world`` gloo ranks; each rank's results. Killed at the deadline."""
    directory.mkdir(parents=True, exist_ok=True)
    store = directory / f"{scenario}-{world}.store"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "src"), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    logs = [directory / f"{scenario}-{world}-rank{r}.log" for r in range(world)]
    procs = []
    for rank in range(world):
        with open(logs[rank], "w") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(HERE),
                        scenario,
                        str(rank),
                        str(world),
                        str(store),
                        str(directory),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=REPO,
                )
            )
    end = time.monotonic() + deadline
    while any(p.poll() is None for p in procs):
        failed = any(p.returncode not in (None, 0) for p in procs)  # the others would only wait
        if failed or time.monotonic() > end:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if not failed:
                pytest.fail(
                    f"{scenario} on {world} ranks did not finish within {deadline} s (ranks "
                    f"killed); logs:\n{_tails(logs)}"
                )
        time.sleep(0.05)
    bad = [(r, proc.returncode) for r, proc in enumerate(procs) if proc.returncode != 0]
    assert not bad, f"{scenario}: ranks (rank, exit code) {bad} failed; logs:\n{_tails(logs)}"
    paths = [directory / f"{scenario}-{world}-rank{r}.pt" for r in range(world)]
    return [torch.load(p) if p.exists() else None for p in paths]  # None: a rank that left early


def _tails(logs) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)


@pytest.fixture(scope="module")
def grid_results(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:  # one launch per world size, failed or not
            try:
                cache[world] = launch("grid", world, tmp_path_factory.mktemp(f"grid{world}"))
            except (AssertionError, pytest.fail.Exception) as error:
                cache[world] = error
        if isinstance(cache[world], BaseException):
            pytest.fail(f"the {world}-rank grid run failed: {cache[world]}", pytrace=False)
        return cache[world]

    return get


# --------------------------------------------------------------------------------------------
# the grid: W ranks == one process on the concatenated batch
# --------------------------------------------------------------------------------------------


def close(actual, expected, dtype, what, table=TOL):
    tol = table[dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _valid_rows(t, mask):
    """(N, C, L) -> (M, C): the valid positions' values, in batch order."""
    return t.transpose(1, 2)[mask]


def reference_steps(case: Case, world: int):
    """One process on the whole batch; masked cases: BatchNorm on the valid values only."""
    bn = make_module(bnlab.nn.BatchNorm, case)
    if not case.masked:
        return run_steps(bn, case, world)
    steps = []
    for step in range(STEPS):
        x, dy, mask = case_data(case, world, step)
        xv = _valid_rows(x, mask).clone().requires_grad_()
        out = bn(xv)
        out.backward(_valid_rows(dy, mask))
        steps.append(
            {
                "out": out.detach(),
                "dx": xv.grad,
                "dw": bn.weight.grad.clone(),
                "db": bn.bias.grad.clone(),
                **{name: buf.clone() for name, buf in bn.named_buffers()},
            }
        )
        bn.zero_grad()
    return steps


def masked_composite(case: Case, world: int, step: int, bn):
    """Masked batch norm written in differentiable PyTorch ops (float64): the exact derivative."""
    x, dy, mask = case_data(case, world, step)
    x = x.clone().requires_grad_()
    w, b = (bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_())
    valid = mask.unsqueeze(1)
    n = mask.sum()
    mean = torch.where(valid, x, 0).sum((0, 2)) / n
    var = torch.where(valid, (x - mean[:, None]) ** 2, 0).sum((0, 2)) / n
    out = (x - mean[:, None]) / torch.sqrt(var[:, None] + bn.eps) * w[:, None] + b[:, None]
    out.backward(dy)
    return out.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_ranks_match_one_process(grid_results, world, name):
    case = CASES[name]
    ranks = [r[name] for r in grid_results(world)]
    expected = reference_steps(case, world)
    first = make_module(bnlab.nn.BatchNorm, case)  # the starting state, for the composite check
    for step in range(STEPS):
        got = [r[step] for r in ranks]
        ref = expected[step]
        if "error" in ref or any("error" in g for g in got):
            assert "error" in ref, f"step {step}: ranks raised {[g.get('error') for g in got]}"
            for g in got:  # every rank raises the single-process error
                assert "Expected more than 1 value per channel when training" in g.get("error", "")
            continue
        out = torch.cat([g["out"] for g in got])
        dx = torch.cat([g["dx"] for g in got])
        for g in got:  # an empty rank returns an empty output and an empty gradient
            assert g["out"].shape == g["dx"].shape and g["out"].dtype == case.dtype
            if case.layout == "channels_last" and g["out"].shape[0]:
                assert g["out"].is_contiguous(memory_format=torch.channels_last)
                assert g["dx"].is_contiguous(memory_format=torch.channels_last)
        if case.masked:
            x, dy, mask = case_data(case, world, step)
            close(_valid_rows(out, mask), ref["out"], case.dtype, f"step {step} valid outputs")
            if (
                case.masked == "padding"
            ):  # padding outputs depend on the statistics: exact derivative
                c_out, c_dx, c_dw, c_db = masked_composite(case, world, step, first)
                close(out, c_out, case.dtype, f"step {step} all outputs (composite)")
                close(dx, c_dx, case.dtype, f"step {step} all dx (composite)")
                close(
                    sum(g["dw"] for g in got),
                    c_dw,
                    case.dtype,
                    f"step {step} dweight (composite)",
                    GRAD_TOL,
                )
                close(
                    sum(g["db"] for g in got),
                    c_db,
                    case.dtype,
                    f"step {step} dbias (composite)",
                    GRAD_TOL,
                )
            else:  # the loss ignores padding outputs: the valid positions are a batch of their own
                close(_valid_rows(dx, mask), ref["dx"], case.dtype, f"step {step} valid dx")
                pad = ~mask.unsqueeze(1).expand_as(dx)
                assert (dx[pad] == 0).all(), (
                    "padding got a gradient it has no path for (dy = 0 there)"
                )
        else:
            close(out, ref["out"], case.dtype, f"step {step} output")
            close(dx, ref["dx"], case.dtype, f"step {step} dx")
        if case.affine and case.masked != "padding":
            close(
                sum(g["dw"] for g in got),
                ref["dw"],
                case.dtype,
                f"step {step} sum of dweight",
                GRAD_TOL,
            )
            close(
                sum(g["db"] for g in got),
                ref["db"],
                case.dtype,
                f"step {step} sum of dbias",
                GRAD_TOL,
            )
        for r, g in enumerate(got):
            for key in ("running_mean", "running_var"):
                close(g[key], ref[key], case.dtype, f"step {step} rank {r} {key}")
            assert int(g["num_batches_tracked"]) == int(ref["num_batches_tracked"]), f"rank {r}"


# --------------------------------------------------------------------------------------------
# ranks out of step: an error on every rank, never a hang
# --------------------------------------------------------------------------------------------


def test_ranks_out_of_step_raise_clear_errors(tmp_path):
    start = time.monotonic()
    ranks = launch("mismatch", 2, tmp_path, deadline=60)
    for r, result in enumerate(ranks):
        forward, backward = result["forward"], result["backward"]
        assert forward.startswith("SyncBatchNormError"), f"rank {r}: {forward}"
        assert "ranks disagree" in forward and "forward" in forward
        assert re.search(
            r"rank 0: call 1 of a 4-channel layer, rank 1: call 2 of a 4-channel layer", forward
        ), forward
        assert "same number of times" in forward
        assert backward.startswith("SyncBatchNormError") and "backward" in backward, backward
        assert "rank 0: call 1" in backward and "rank 1: call 2" in backward, backward
    skipped = ranks[0]["timeout"]  # rank 1 never made this call, rank 0 waited 5 s for it
    assert skipped["error"].startswith("SyncBatchNormError"), skipped
    assert "within the 5 s timeout" in skipped["error"] and "rank 0 of 2" in skipped["error"]
    assert 4.5 <= skipped["seconds"] < 15, skipped
    assert time.monotonic() - start < 45


def test_rank_that_exits_makes_the_others_fail(tmp_path):
    ranks = launch("exit", 2, tmp_path, deadline=60)
    result = ranks[0]
    assert result["error"].startswith("SyncBatchNormError"), result
    assert re.search(
        r"forward .* on rank 0 of 2: the exchange of batch statistics "
        r"(failed after|did not complete within)",
        result["error"],
    ), result
    assert "crashed" in result["error"]
    assert result["seconds"] < 12, result  # the lost peer, or the 10 s timeout at the latest


# --------------------------------------------------------------------------------------------
# the process group is the user's: bnlab keeps no reference to it
# --------------------------------------------------------------------------------------------


def test_graphs_do_not_keep_the_group_alive_past_destroy(tmp_path):
    """A script's last loss keeps its autograd graph (and so the SyncBatchNorm calls' contexts)
    until interpreter exit; a strong reference there kept the group alive past
    destroy_process_group(), so that gloo tore it down during shutdown, where it can abort."""
    for r, result in enumerate(launch("release", 2, tmp_path, deadline=60)):
        assert result["graphs_alive"], f"rank {r}: the test lost its graphs: {result}"
        assert not result["group_alive"], f"rank {r}: the group outlived destroy_process_group"
        error = result["late_backward"]
        assert error.startswith("SyncBatchNormError") and "backward" in error, error
        assert "no longer exists" in error and "destroy_process_group" in error, error


def accumulation_data() -> torch.Tensor:
    """64 samples: 2 ranks x 4 micro-batches x 8, the same on every rank (each takes its half)."""
    g = torch.Generator().manual_seed(11)
    return torch.randn(64, 4, 3, 3, generator=g, dtype=torch.float64) * 2 + 0.5


def test_accumulation_across_ranks_equals_one_process_on_every_sample(tmp_path):
    """bnlab.accumulate over 4 micro-batches on each of 2 ranks: one update with the statistics
    of all 64 samples, as one process's training forward of them all gives."""
    whole = BatchNorm2d(4).double()
    whole(accumulation_data())
    for r, result in enumerate(launch("accumulate", 2, tmp_path, deadline=60)):
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(
                result[key], getattr(whole, key), rtol=0, atol=1e-12, msg=f"rank {r} {key}"
            )
        assert result["num_batches_tracked"] == 1 and result["merged"] == 4


# --------------------------------------------------------------------------------------------
# the example
# --------------------------------------------------------------------------------------------


def test_torchrun_example_trains(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = (
        [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    command = [
        *launcher,
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "examples" / "ddp_train.py"),
        "--epochs",
        "1",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the example did not finish within 120 s: {error.stdout!r} {error.stderr!r}")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    match = re.search(r"test accuracy: (\d+\.\d+)", done.stdout)
    assert match, log[-4000:]
    assert float(match.group(1)) > 0.2, log[-4000:]  # ten classes: chance is 0.1 (one epoch: ~0.4)
    assert re.search(r"epoch 1/1 .*train loss", done.stdout), log[-4000:]
    assert time.monotonic() - start < 120


# --------------------------------------------------------------------------------------------
# the ranks' side (this file run as a script)
# --------------------------------------------------------------------------------------------


def _grid_scenario(rank, world):
    results = {}
    for name, case in CASES.items():
        sizes = case.sizes(world)
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        bn = make_module(SyncBatchNorm, case, timeout=WORKER_TIMEOUT)
        results[name] = run_steps(bn, case, world, rows)
    return results


def _error_text(fn):
    try:
        fn()
    except Exception as error:  # the test checks which
        return f"{type(error).__name__}: {error}"
    return "no error"


def _mismatch_scenario(rank, world):
    results = {}
    a, b = (SyncBatchNorm(4, timeout=WORKER_TIMEOUT) for _ in range(2))
    x = torch.randn(3, 4)
    a(x)  # call 1 of a on both ranks: fine
    # rank 0 goes on with b (its call 1), rank 1 calls a again (call 2): same size, wrong call
    results["forward"] = _error_text(lambda: (b if rank == 0 else a)(x))
    c = SyncBatchNorm(4, timeout=WORKER_TIMEOUT)
    first, second = c(x.requires_grad_()), c(x)  # calls 1 and 2, in step
    # rank 0 differentiates call 1, rank 1 call 2
    results["backward"] = _error_text(lambda: (first if rank == 0 else second).sum().backward())
    d = SyncBatchNorm(4, timeout=5)
    d(x)
    if rank == 0:  # rank 1 skips this call (alive, but never joins): rank 0 must give up after 5 s
        start = time.monotonic()
        results["timeout"] = {
            "error": _error_text(lambda: d(x)),
            "seconds": time.monotonic() - start,
        }
    else:
        _wait_for(Path(sys.argv[5]) / "mismatch-2-rank0.pt", 30)
    return results


def _exit_scenario(rank, world):
    bn = SyncBatchNorm(4, timeout=10)
    x = torch.randn(3, 4, requires_grad=True)
    bn(x).sum().backward()
    if rank == 1:
        os._exit(0)  # leaves without a word, as a crashed rank does
    start = time.monotonic()
    error = _error_text(lambda: bn(x))
    return {"error": error, "seconds": time.monotonic() - start}


def _release_scenario(rank, world):
    import gc
    import weakref

    import torch.distributed as dist

    gc.disable()  # no collection may hide a reference: what frees the group is the refcount
    bn = SyncBatchNorm(4, timeout=WORKER_TIMEOUT)
    x = torch.randn(3, 4, requires_grad=True)
    loss = bn(x).square().sum()
    loss.backward()  # a finished step whose loss is still around, as in a script
    pending = bn(x).sum()  # a forward whose backward would come after the destroy
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    result = {
        "graphs_alive": loss.grad_fn is not None and pending.grad_fn is not None,
        "group_alive": group() is not None,
        "late_backward": _error_text(pending.backward),
    }
    gc.enable()
    return result


def _accumulate_scenario(rank, world):
    import bnlab

    bn = SyncBatchNorm(4, timeout=WORKER_TIMEOUT).double()
    mine = accumulation_data().chunk(world)[rank]
    with bnlab.accumulate(bn) as acc:
        for x in mine.chunk(4):
            bn(x.requires_grad_()).square().sum().backward()
    return {
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
        "num_batches_tracked": int(bn.num_batches_tracked),
        "merged": acc.report[0].merged,
    }


def _wait_for(path: Path, seconds: float) -> None:
    end = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.1)


def _worker(scenario, rank, world, store, directory):
    import torch.distributed as dist

    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    run = {
        "grid": _grid_scenario,
        "mismatch": _mismatch_scenario,
        "exit": _exit_scenario,
        "release": _release_scenario,
        "accumulate": _accumulate_scenario,
    }[scenario]
    results = run(rank, world)
    path = Path(directory) / f"{scenario}-{world}-rank{rank}.pt"
    torch.save(results, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)  # appears whole: another rank may be waiting for it
    print(f"rank {rank}: done", flush=True)
    if scenario == "grid":
        dist.destroy_process_group()
    # after a timed-out exchange gloo may still hold the unfinished work: leave without tearing down
    os._exit(0)


if __name__ == "__main__":
    _worker(*sys.argv[1:6])
