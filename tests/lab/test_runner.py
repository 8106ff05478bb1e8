"""The lab's runner: run directories, checkpoints, exact resume (in-process and after kill -9)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from bnlab.lab.common import classifier_job, load_data, mlp
from bnlab.lab.runner import CHECKPOINT, Report, RunError, experiment, resume, start, write_report


class Interrupt(Exception):
    pass


CRASH = {"at": 0}  # raise in job "b" at the first evaluation at or after this step (0: never)


@dataclass
class TinyConfig:
    steps: int = 60  # per job
    eval_every: int = 7  # not a divisor of checkpoint_every: rows after a checkpoint get discarded
    momentum: float = 0.9  # optimizer state must survive a resume
    checkpoint_every: int = 20  # steps


def _tiny_report(view):
    return Report(f"# tiny\n\n{len(view.rows)} rows\n", {"rows": len(view.rows)})


@experiment("tiny-test", TinyConfig, _tiny_report)
def tiny(run):
    """Two tiny BN nets with momentum SGD (a test fixture)."""
    c = run.config
    data = load_data("digits")
    for key in ("a", "b"):

        def build():
            return mlp(data.num_features, data.num_classes, 16, 2, norm="bn")

        def extra(i, model, key=key):
            if key == "b" and CRASH["at"] and i >= CRASH["at"]:
                raise Interrupt
            return {}

        classifier_job(
            run,
            key,
            build=build,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=c.momentum),
            x=data.train_x,
            y=data.train_y,
            test_x=data.test_x,
            test_y=data.test_y,
            steps=c.steps,
            batch_size=16,
            seed=3,
            eval_every=c.eval_every,
            extra_eval=extra,
        )


def test_a_run_writes_every_output(tmp_path):
    directory, report = start("tiny-test", ["--steps=30"], out=tmp_path, progress=False)
    assert directory.parent == tmp_path / "tiny-test"
    for name in (
        "config.json",
        "run.json",
        "metrics.json",
        "metrics.csv",
        "summary.json",
        "report.md",
        CHECKPOINT,
    ):
        assert (directory / name).stat().st_size > 0, name
    assert json.loads((directory / "config.json").read_text())["steps"] == 30
    info = json.loads((directory / "run.json").read_text())
    assert info["status"] == "complete" and set(info["job_seconds"]) == {"a", "b"}
    rows = json.loads((directory / "metrics.json").read_text())
    assert [(r["job"], r["step"]) for r in rows] == [
        (k, s) for k in "ab" for s in (7, 14, 21, 28, 30)
    ]
    assert (
        (directory / "metrics.csv")
        .read_text()
        .splitlines()[0]
        .startswith("job,step,train_loss,test_accuracy")
    )
    # a second run in the same second gets its own directory
    again, _ = start("tiny-test", ["--steps=5"], out=tmp_path, progress=False)
    assert again != directory
    # bnlab report rewrites the report from the saved files
    (directory / "report.md").unlink()
    assert write_report(directory).summary == {"rows": 10}
    assert (directory / "report.md").read_text().startswith("# tiny")


def test_an_interrupted_run_resumes_to_identical_metrics(tmp_path):
    whole, _ = start("tiny-test", [], out=tmp_path / "whole", progress=False)
    CRASH["at"] = 45
    try:
        with pytest.raises(Interrupt):
            start("tiny-test", [], out=tmp_path / "cut", progress=False)
    finally:
        CRASH["at"] = 0
    cut = next((tmp_path / "cut" / "tiny-test").iterdir())
    checkpoint = torch.load(cut / CHECKPOINT, weights_only=True)
    assert (
        checkpoint["job"] == "b" and checkpoint["step"] == 40 and checkpoint["completed"] == ["a"]
    )
    assert json.loads((cut / "run.json").read_text())["status"] == "running"
    # the crash came at step 49 of job b, after its row at step 42: rows the resume must discard
    resume(cut, progress=False)
    assert (cut / "metrics.json").read_text() == (whole / "metrics.json").read_text()
    assert json.loads((cut / "run.json").read_text())["resumed"] == 1


def test_resume_refuses_foreign_or_changed_runs(tmp_path):
    directory, _ = start("tiny-test", ["--steps=5"], out=tmp_path, progress=False)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "steps": 6}))
    with pytest.raises(RunError, match="differs from the checkpoint"):
        resume(directory, progress=False)
    with pytest.raises(RunError, match="not found"):
        resume(tmp_path, progress=False)


def test_a_non_finite_loss_ends_the_job_without_crashing(tmp_path):
    directory, _ = start("lr", ["--lrs=10", "--steps=40"], out=tmp_path, progress=False)
    rows = json.loads((directory / "metrics.json").read_text())
    plain = [r for r in rows if r["net"] == "plain"]
    assert plain[-1]["diverged"] and plain[-1]["step"] < 40 and plain[-1]["train_loss"] is None
    assert "diverged at step" in (directory / "report.md").read_text()


_KILL_SCRIPT = """
import sys
from bnlab.lab.runner import start
start("sigmoid", sys.argv[2:], directory=sys.argv[1], progress=False, threads=1)
"""


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_kill_9_and_resume_gives_the_uninterrupted_metrics(tmp_path, restore_threads):
    """A run killed with SIGKILL after its first checkpoint and resumed ends with the same
    metrics.json as an uninterrupted run (the victim runs in a subprocess; the reference and the
    resume in-process, all with one thread)."""
    args = ["--depth=2", "--hidden=16", "--steps=500", "--eval_every=40", "--checkpoint_every=100"]
    killed = tmp_path / "killed"
    victim = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(killed), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while not (killed / CHECKPOINT).exists():
            assert victim.poll() is None and time.monotonic() < deadline, (
                "no checkpoint before the run ended"
            )
            time.sleep(0.002)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
    assert json.loads((killed / "run.json").read_text())["status"] == "running"
    checkpoint = torch.load(killed / CHECKPOINT, weights_only=True)
    assert checkpoint["job"] == "plain" and checkpoint["completed"] == []  # killed mid-job
    resume(killed, progress=False)
    whole, _ = start("sigmoid", args, out=tmp_path / "whole", progress=False, threads=1)
    assert (killed / "metrics.json").read_text() == (whole / "metrics.json").read_text()
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "complete" and info["resumed"] == 1 and info["threads"] == 1
