"""The lab's runner: a run directory, training jobs with atomic checkpoints, exact resume, reports.

An experiment is one config dataclass and one function ``fn(run: Run) -> None`` that trains one or
more *jobs* through :meth:`Run.train` (each job: a model trained for a number of steps, evaluated
every so often; a learning-rate sweep is one job per rate and net), plus a ``report(view) ->
Report`` that turns the saved metrics into plots and markdown. Every run writes::

    runs/<experiment>/<timestamp>/
        config.json      the resolved config (every default filled in)
        run.json         experiment name, status, command, timings, torch version, threads
        checkpoint.pt    the resume point (written atomically every checkpoint_every steps)
        metrics.json     every evaluation row (a list of flat dicts); metrics.csv the same
        summary.json     the report's headline numbers
        report.md        the report, with its PNG plots beside it

**Determinism and resume.** All randomness comes from explicitly seeded generators: each job's
model is built under :func:`seeded` and its mini-batches are drawn from a ``torch.Generator`` that
the job registers in its ``state``. Every ``checkpoint_every`` steps of a job, :meth:`Run.train`
writes ``checkpoint.pt`` through a temporary file and ``os.replace`` (a kill at any moment, -9
included, leaves either the old or the new checkpoint): the job's position, the ``state_dict`` of
every registered object (models, optimizers, trackers), the generators' states, the global torch
RNG state, the loss accumulator, the jobs finished so far and every metrics row up to that point.
``bnlab run --resume RUN_DIR`` reruns the experiment function from the top with the saved config:
finished jobs are skipped (their rows come from the checkpoint), the interrupted job is rebuilt,
loaded from the checkpoint and continued from its step, and rows written after the checkpoint are
discarded, so the final metrics equal an uninterrupted run's exactly (same machine, same thread
count). Wall-clock times go to ``run.json``, never to the metrics.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from . import config as cfg
from .datasets import choose_dataset, load_data

__all__ = [
    "Experiment",
    "Report",
    "Run",
    "RunView",
    "EXPERIMENTS",
    "experiment",
    "get_experiment",
    "start",
    "resume",
    "write_report",
    "seeded",
    "CHECKPOINT",
    "RunError",
]

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


class RunError(RuntimeError):
    """A run directory that cannot be resumed or reported (missing files, another experiment)."""


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------


@dataclass
class Report:
    markdown: str
    summary: dict[str, Any] = field(default_factory=dict)  # headline numbers -> summary.json


@dataclass(frozen=True)
class Experiment:
    name: str
    config: type  # the config dataclass (every field has a default)
    fn: Callable[["Run"], None]
    report: Callable[["RunView"], Report]

    @property
    def description(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def default_config(self) -> Any:
        return self.config()

    def make_config(self, overrides=()) -> Any:
        """The default config with the overrides applied, then resolved (dataset-dependent defaults
        filled in) and validated. A ``data_dir`` given without a dataset selects MNIST."""
        if not isinstance(overrides, dict):
            overrides = cfg.parse_overrides(self.config, overrides, self.name)
        overrides = choose_dataset(self.config, overrides, self.name)
        config = cfg.apply_overrides(self.config(), overrides, self.name)
        if hasattr(config, "resolve"):
            try:
                config = config.resolve()
            except (TypeError, ValueError) as error:
                raise cfg.ConfigError(f"{self.name}: {error}") from None
        return config


EXPERIMENTS: dict[str, Experiment] = {}
_MODULES = (
    "fig1",
    "lr_sweep",
    "init_scale",
    "batch_size",
    "conv",
    "sigmoid",
    "small_batch",
    "seq_mnist",
    "grad_flow",
    "shift",
)


def experiment(name: str, config: type, report: Callable[["RunView"], Report]):
    """Register ``fn(run)`` as the experiment ``name`` with its config class and report."""

    def register(fn: Callable[["Run"], None]) -> Callable[["Run"], None]:
        if not dataclasses.is_dataclass(config):
            raise TypeError(f"{name}: config must be a dataclass, got {config!r}")
        EXPERIMENTS[name] = Experiment(name, config, fn, report)
        return fn

    return register


def _load_all() -> None:
    import importlib

    for module in _MODULES:
        importlib.import_module(f"{__package__}.{module}")


def all_experiments() -> dict[str, Experiment]:
    """Every registered experiment: the lab's own in their fixed order, then any others."""
    _load_all()
    order = {f"{__package__}.{m}": i for i, m in enumerate(_MODULES)}
    return dict(
        sorted(EXPERIMENTS.items(), key=lambda kv: order.get(kv[1].fn.__module__, len(order)))
    )


def get_experiment(name: str) -> Experiment:
    _load_all()
    if name not in EXPERIMENTS:
        import difflib

        close = difflib.get_close_matches(name, list(EXPERIMENTS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise cfg.ConfigError(
            f"unknown experiment {name!r}{hint}; experiments: " + ", ".join(EXPERIMENTS)
        )
    return EXPERIMENTS[name]


# ------------------------------------------------------------------------------------------------
# Determinism helpers
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block (e.g. a model's construction, whose default inits draw from torch's global
    generator) with the global generator seeded to ``seed``, and restore its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _get_state(obj: Any) -> Any:
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise TypeError(
        f"cannot checkpoint a {type(obj).__name__}: register objects with state_dict() "
        "or torch.Generators"
    )


def _set_state(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    else:
        obj.load_state_dict(state)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    _atomic_write(path, text.encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/Infinity; the row's "diverged" says why
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(_jsonable(value), indent=2) + "\n"


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


class Run:
    """One execution of an experiment in its directory; experiments call :meth:`train`."""

    def __init__(
        self,
        exp: Experiment,
        config: Any,
        directory: Path,
        *,
        progress: bool = True,
        checkpoint: Optional[dict] = None,
    ) -> None:
        self.experiment = exp
        self.config = config
        self.dir = Path(directory)
        self.progress = progress
        self.checkpoint_every = int(getattr(config, "checkpoint_every", 0) or 0)
        self.rows: list[dict[str, Any]] = []
        self.completed: list[str] = []
        self.total_jobs: Optional[int] = None  # set by the experiment for "[3/40]" in the bar
        self.job_seconds: dict[str, float] = {}
        self._jobs_seen = 0
        self._started: set[str] = set()
        self._pending: Optional[dict] = None
        self.resumed_from: Optional[str] = None
        if checkpoint is not None:
            self.rows = list(checkpoint["rows"])
            self.completed = list(checkpoint["completed"])
            self.job_seconds = dict(checkpoint.get("job_seconds", {}))
            if checkpoint.get("job") is not None:
                self._pending = checkpoint
                self.resumed_from = f"job {checkpoint['job']!r} at step {checkpoint['step']}"
            else:
                self.resumed_from = f"after {len(self.completed)} finished job(s)"

    # -- metrics -----------------------------------------------------------------------------
    def job_rows(self, key: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["job"] == key]

    def result(self, key: str) -> dict[str, Any]:
        """The last row of a finished job."""
        rows = self.job_rows(key)
        if not rows:
            raise KeyError(f"no rows for job {key!r}")
        return rows[-1]

    # -- training ------------------------------------------------------------------------------
    def train(
        self,
        key: str,
        *,
        steps: int,
        step: Callable[[int], Any],
        evaluate: Callable[[int], Mapping[str, Any]],
        state: Mapping[str, Any],
        eval_every: Optional[int] = None,
        eval_at_start: bool = False,
        tags: Optional[Mapping[str, Any]] = None,
    ) -> dict[str, Any]:
        """Train one job and return its last metrics row.

        Args:
            key: the job's name, unique in the run (e.g. ``"bn"``, ``"lr=0.1/plain"``).
            steps: optimisation steps.
            step: ``step(i)`` does step i (1-based) and returns the mini-batch loss (tensor or
                float).
            evaluate: ``evaluate(i)`` returns the metrics at step i (after step i; 0 = before
                training).
            state: every object whose state the job's future depends on, by name: modules,
                optimizers, torch.Generators, trackers (anything with state_dict/load_state_dict).
            eval_every: evaluate every so many steps (always at the last step); None: at the end
                only.
            eval_at_start: evaluate before the first step too (a curve's starting point).
            tags: constant columns added to every row of the job (e.g. ``{"lr": 0.1, "norm":
                "bn"}``).

        A non-finite loss ends the job at that step (evaluated there, ``diverged`` True) instead of
        raising. A finished job (on resume) is not rerun: its saved last row is returned.
        """
        if steps < 0:
            raise ValueError(f"{key}: steps must be >= 0, got {steps}")
        self._jobs_seen += 1
        if key in self._started:
            raise ValueError(
                f"job {key!r} was already trained in this run (job keys must be unique)"
            )
        self._started.add(key)
        if key in self.completed:
            return self.result(key)
        tags = dict(tags or {})
        start, loss_sum, loss_count = 0, 0.0, 0
        if self._pending is not None:
            pending = self._pending
            if pending["job"] != key:
                raise RunError(
                    f"the checkpoint is inside job {pending['job']!r}, but the experiment "
                    f"started job {key!r} first: its job order is not deterministic"
                )
            missing = set(pending["state"]) ^ set(state)
            if missing:
                raise RunError(
                    f"job {key!r}: the checkpoint's state names {sorted(pending['state'])} "
                    f"do not match the job's {sorted(state)}"
                )
            for name, obj in state.items():
                _set_state(obj, pending["state"][name])
            torch.set_rng_state(pending["torch_rng"])
            start, loss_sum, loss_count = (
                pending["step"],
                pending["loss_sum"],
                pending["loss_count"],
            )
            self._pending = None
        elif eval_at_start:
            self._log(key, 0, tags, math.nan, evaluate(0), diverged=False)

        desc = f"{self.experiment.name} {key}"
        if self.total_jobs:
            desc = f"[{self._jobs_seen}/{self.total_jobs}] " + desc
        bar = _progress(total=steps, initial=start, desc=desc, disable=not self.progress)
        began = time.perf_counter()
        last: Optional[dict] = self.job_rows(key)[-1] if self.job_rows(key) else None
        shown_loss = math.nan
        i = start
        try:
            for i in range(start + 1, steps + 1):
                loss = float(step(i))
                if not math.isfinite(loss):
                    last = self._log(key, i, tags, loss, evaluate(i), diverged=True)
                    bar.set_postfix_str(f"diverged at step {i}")
                    break
                loss_sum += loss
                loss_count += 1
                shown_loss = loss if math.isnan(shown_loss) else 0.95 * shown_loss + 0.05 * loss
                if (eval_every and i % eval_every == 0) or i == steps:
                    last = self._log(
                        key, i, tags, loss_sum / loss_count, evaluate(i), diverged=False
                    )
                    loss_sum, loss_count = 0.0, 0
                bar.update(1)
                if i % 25 == 0 or i == steps:
                    bar.set_postfix_str(_postfix(shown_loss, last))
                if self.checkpoint_every and i % self.checkpoint_every == 0 and i < steps:
                    self._save(
                        job=key, step=i, state=state, loss_sum=loss_sum, loss_count=loss_count
                    )
        finally:
            bar.close()
        if last is None:  # steps == 0 and no start evaluation
            last = self._log(key, 0, tags, math.nan, evaluate(0), diverged=False)
        self.job_seconds[key] = self.job_seconds.get(key, 0.0) + time.perf_counter() - began
        self.completed.append(key)
        self._save(job=None)
        return last

    def _log(
        self,
        key: str,
        step: int,
        tags: dict,
        loss: float,
        metrics: Mapping[str, Any],
        diverged: bool,
    ) -> dict[str, Any]:
        row = {
            "job": key,
            **tags,
            "step": step,
            "train_loss": loss,
            **dict(metrics),
            "diverged": diverged,
        }
        self.rows.append(row)
        return row

    def _save(
        self,
        job: Optional[str],
        step: int = 0,
        state: Optional[Mapping[str, Any]] = None,
        loss_sum: float = 0.0,
        loss_count: int = 0,
    ) -> None:
        payload = {
            "format": FORMAT,
            "experiment": self.experiment.name,
            "config": cfg.to_dict(self.config),
            "rows": self.rows,
            "completed": self.completed,
            "job_seconds": self.job_seconds,
            "job": job,
            "step": step,
            "loss_sum": loss_sum,
            "loss_count": loss_count,
            "state": {name: _get_state(obj) for name, obj in (state or {}).items()},
            "torch_rng": torch.get_rng_state(),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        _atomic_write(self.dir / CHECKPOINT, buffer.getvalue())


def _progress(**kwargs):
    from tqdm import tqdm

    return tqdm(leave=False, dynamic_ncols=True, mininterval=0.5, file=sys.stderr, **kwargs)


def _postfix(loss: float, row: Optional[dict]) -> str:
    text = f"loss {loss:.4f}"
    if row is not None and isinstance(row.get("test_accuracy"), float):
        text += f", acc {row['test_accuracy']:.4f}"
    return text


# ------------------------------------------------------------------------------------------------
# Views for reports
# ------------------------------------------------------------------------------------------------


@dataclass
class RunView:
    """What a report sees: the config, the metrics rows, the directory to write plots into."""

    experiment: Experiment
    config: Any
    rows: list[dict[str, Any]]
    dir: Path
    info: dict[str, Any]

    @property
    def complete(self) -> bool:
        return self.info.get("status") == "complete"

    def jobs(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.setdefault(row["job"], None)
        return list(seen)

    def job_rows(self, key: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["job"] == key]

    def last(self, key: str) -> Optional[dict[str, Any]]:
        rows = self.job_rows(key)
        return rows[-1] if rows else None

    def plot_path(self, name: str) -> Path:
        return self.dir / name


def write_metrics(directory: Path, rows: list[dict[str, Any]]) -> None:
    _atomic_text(directory / "metrics.json", dumps(rows))
    columns: dict[str, None] = {}
    for row in rows:
        for k in row:
            columns.setdefault(k, None)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    _atomic_text(directory / "metrics.csv", out.getvalue())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} not found: not a bnlab run directory?") from None
    except json.JSONDecodeError as error:
        raise RunError(f"{path}: not valid JSON ({error})") from None


def _restore_rows(rows: list[dict]) -> list[dict]:
    # JSON stores non-finite floats as null; the losses are the only columns that can hold them
    return [
        {k: (math.nan if v is None and k == "train_loss" else v) for k, v in r.items()}
        for r in rows
    ]


def write_report(
    directory: Path, rows: Optional[list[dict]] = None, info: Optional[dict] = None
) -> Report:
    """(Re)write metrics, plots, report.md and summary.json of the run in ``directory``."""
    directory = Path(directory)
    info = info if info is not None else _read_json(directory / "run.json")
    exp = get_experiment(info["experiment"])
    config = cfg.from_dict(exp.config, _read_json(directory / "config.json"), exp.name)
    if rows is None:
        checkpoint = _load_checkpoint(directory)
        if checkpoint is not None:
            rows = list(checkpoint["rows"])
        else:
            rows = (
                _restore_rows(_read_json(directory / "metrics.json"))
                if (directory / "metrics.json").exists()
                else []
            )
    write_metrics(directory, rows)
    view = RunView(exp, config, rows, directory, info)
    report = exp.report(view)
    markdown = report.markdown
    if not view.complete:
        markdown = (
            f"> **Incomplete run** ({len(view.jobs())} job(s) with metrics so far): "
            f"resume it with `bnlab run --resume {directory}`.\n\n" + markdown
        )
    _atomic_text(directory / "report.md", markdown)
    _atomic_text(directory / "summary.json", dumps(report.summary))
    return Report(markdown, report.summary)


def _load_checkpoint(directory: Path) -> Optional[dict]:
    path = directory / CHECKPOINT
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - a checkpoint that cannot be read is reported as such
        raise RunError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error})") from None


# ------------------------------------------------------------------------------------------------
# Starting, resuming
# ------------------------------------------------------------------------------------------------


def _new_dir(base: Path, name: str) -> Path:
    parent = Path(base) / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        candidate = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RunError(f"could not create a run directory under {parent}")


def _info(exp: Experiment, status: str, **extra) -> dict[str, Any]:
    return {"experiment": exp.name, "status": status, **extra}


def _execute(
    exp: Experiment,
    config: Any,
    directory: Path,
    info: dict,
    progress: bool,
    checkpoint: Optional[dict],
    threads: Optional[int],
) -> tuple[Path, Report]:
    if threads is not None:
        if threads < 1:
            raise cfg.ConfigError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    run = Run(exp, config, directory, progress=progress, checkpoint=checkpoint)
    info.update(
        status="running", torch=torch.__version__, threads=torch.get_num_threads(), pid=os.getpid()
    )
    _atomic_text(directory / "run.json", dumps(info))
    began = time.perf_counter()
    exp.fn(run)
    info["status"] = "complete"
    info["finished"] = datetime.now().isoformat(timespec="seconds")
    info["elapsed_s"] = round(info.get("elapsed_s", 0.0) + time.perf_counter() - began, 3)
    info["job_seconds"] = {k: round(v, 3) for k, v in run.job_seconds.items()}
    info.pop("pid", None)
    write_metrics(directory, run.rows)
    report = write_report(directory, run.rows, info)
    _atomic_text(directory / "run.json", dumps(info))
    return directory, report


def _require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # fail before training, not after it
        raise RunError(
            "the lab draws its plots with matplotlib, which is not installed: "
            "pip install matplotlib"
        )


def start(
    name: str,
    overrides=(),
    out: str | os.PathLike = "runs",
    progress: bool = True,
    directory: Optional[Path] = None,
    threads: Optional[int] = None,
) -> tuple[Path, Report]:
    """Run experiment ``name`` with the overrides in a new ``out/<name>/<timestamp>/``.

    ``threads``: torch's intra-op threads for the run (None: leave as set). The lab's networks are
    small: one thread is the fastest on a busy machine, and a resumed run must use the same count
    as the original to reproduce its floating-point results (``resume`` reuses it).
    """
    exp = get_experiment(name)
    config = exp.make_config(overrides)
    _require_matplotlib()
    if hasattr(
        config, "dataset"
    ):  # a missing or corrupt dataset fails before the run directory exists
        load_data(config.dataset, getattr(config, "data_dir", None))
    directory = Path(directory) if directory is not None else _new_dir(Path(out), name)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_text(directory / "config.json", dumps(cfg.to_dict(config)))
    info = _info(
        exp,
        "running",
        created=datetime.now().isoformat(timespec="seconds"),
        command=" ".join(["bnlab", "run", name, *map(str, overrides)])
        if not isinstance(overrides, dict)
        else f"bnlab run {name} (overrides {overrides})",
        resumed=0,
    )
    return _execute(exp, config, directory, info, progress, checkpoint=None, threads=threads)


def resume(directory: str | os.PathLike, progress: bool = True) -> tuple[Path, Report]:
    """Continue the run in ``directory`` from its last checkpoint (from the start if it has none),
    with the thread count it started with."""
    directory = Path(directory)
    info = _read_json(directory / "run.json")
    exp = get_experiment(info.get("experiment", ""))
    config = cfg.from_dict(exp.config, _read_json(directory / "config.json"), exp.name)
    checkpoint = _load_checkpoint(directory)
    if checkpoint is not None:
        if checkpoint.get("format") != FORMAT or checkpoint.get("experiment") != exp.name:
            raise RunError(
                f"{directory / CHECKPOINT} is not a format-{FORMAT} checkpoint of {exp.name}"
            )
        if checkpoint["config"] != cfg.to_dict(config):
            raise RunError(
                f"{directory}: config.json differs from the checkpoint's config; "
                "a run resumes with the config it started with"
            )
    for stale in directory.glob(f".{CHECKPOINT}.tmp*"):  # a write cut short by a kill
        stale.unlink(missing_ok=True)
    info["resumed"] = info.get("resumed", 0) + 1
    return _execute(exp, config, directory, info, progress, checkpoint, threads=info.get("threads"))
