"""The ``bnlab`` command line."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import click


def dir_option(*names: str, **options):
    """An option that names a directory (click rejects a file there)."""
    return click.option(*names, type=click.Path(file_okay=False), **options)


def out_option(help: str):
    """``--out DIR`` (default runs/), where a command writes its run directory."""
    return dir_option("--out", default="runs", show_default=True, help=help)


def quiet_option():
    """``--quiet``: no progress bars."""
    return click.option("--quiet", is_flag=True, help="No progress bars.")


def threads_option(help: str):
    """``--threads N`` (default 1): torch's intra-op threads for the command."""
    return click.option(
        "--threads", default=1, show_default=True, type=click.IntRange(min=1), help=help
    )


@click.group()
@click.version_option(package_name="bnlab")
def main() -> None:
    """bnlab: batch normalization done right, and a lab that shows why it works."""


@main.command()
@click.option(
    "--steps",
    default=None,
    type=click.IntRange(min=1),
    help="SGD steps for each network  [default: 15,000 on digits, 50,000 on mnist]",
)
@click.option(
    "--lr",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Learning rate, the same for both networks.",
)
@click.option("--batch-size", default=60, show_default=True, type=click.IntRange(min=2))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--dataset",
    default=None,
    type=click.Choice(["digits", "mnist"]),
    help="The bundled 8x8 digits, or MNIST from --data-dir / $BNLAB_DATA_DIR  "
    "[default: mnist with --data-dir, else digits]",
)
@dir_option(
    "--data-dir",
    default=None,
    help="The directory holding MNIST's four IDX files (selects --dataset mnist).",
)
@out_option("Writes OUT/fig1/<timestamp>/.")
@quiet_option()
@threads_option("torch threads (the nets are small: one is fastest on a busy machine).")
def demo(steps, lr, batch_size, seed, dataset, data_dir, out, quiet, threads) -> None:
    """The paper's Figure 1: its sigmoid MLP with and without BN (`bnlab run fig1`).

    Ioffe & Szegedy 2015, section 4.1: 3 hidden layers of 100 sigmoid units, small Gaussian init,
    softmax cross-entropy, mini-batches of 60, plain SGD. Writes the run directory (report.md,
    fig1.png, metrics) and prints both final test accuracies.
    """
    overrides = {"lr": lr, "batch_size": batch_size, "seed": seed}
    given = {"steps": steps, "dataset": dataset, "data_dir": data_dir}
    overrides.update({key: value for key, value in given.items() if value is not None})
    directory, report = _start("fig1", overrides, out, quiet, threads)
    import json

    rows = json.loads((directory / "metrics.json").read_text())
    seconds = json.loads((directory / "run.json").read_text()).get("job_seconds", {})
    config = json.loads((directory / "config.json").read_text())
    click.echo(
        f"{config['dataset']}: {config['steps']:,} steps of SGD per net, lr {lr:g}, "
        f"batch {batch_size}, seed {seed}"
    )
    for net, label in (("plain", "without BN"), ("bn", "with BN   ")):
        last = [r for r in rows if r["job"] == net][-1]
        loss = last["train_loss"]
        click.echo(
            f"{label}: test accuracy {last['test_accuracy']:.4f}  (final training loss "
            f"{loss if loss is None else format(loss, '.4f')}, {seconds.get(net, 0.0):.1f} s)"
        )
    _echo_summary_line(report.summary)
    click.echo(f"report: {directory / 'report.md'}")


def _echo_summary_line(summary: dict) -> None:
    a, b = summary.get("drift_plain_from_0"), summary.get("drift_bn_from_0")
    if a and b:
        click.echo(
            f"sigmoid-input drift (max - min of the median over training): without BN "
            f"{a['median_range']:.3f}, with BN {b['median_range']:.3f}"
        )


@contextlib.contextmanager
def _lab_errors() -> Iterator[None]:
    """A bad config, run directory or dataset ends the command with its message, no traceback."""
    from .data import DatasetError
    from .lab.config import ConfigError
    from .lab.runner import RunError

    try:
        yield
    except (ConfigError, RunError, DatasetError) as error:
        raise click.ClickException(str(error)) from error


def _start(name, overrides, out, quiet, threads=1):
    from .lab.runner import start

    with _lab_errors():
        return start(name, overrides, out=out, progress=not quiet, threads=threads)


# ------------------------------------------------------------------------------------------------
# The lab: list, run, report
# ------------------------------------------------------------------------------------------------


@main.command("list")
def list_command() -> None:
    """The experiments, with what each shows (`bnlab run NAME --help` for its keys)."""
    from .lab.runner import all_experiments

    experiments = all_experiments()
    width = max(map(len, experiments))
    for name, exp in experiments.items():
        click.echo(f"{name:<{width}}  {exp.description}")


def _experiment_help(name: str) -> str:
    from .lab.config import describe
    from .lab.runner import get_experiment

    exp = get_experiment(name)
    doc = (exp.fn.__doc__ or "").strip()
    lines = [
        f"Usage: bnlab run {name} [--key=value ...] [--out DIR] [--quiet]",
        "",
        f"  {doc}",
        "",
        "Keys (defaults; None is resolved per dataset, see config.json of a run):",
        "",
    ]
    rows = describe(exp.config)
    width = max(len(f"--{k}={d}") for k, _, d, _ in rows)
    for key, type_, default, comment in rows:
        lines.append(f"  {f'--{key}={default}':<{width}}  [{type_}] {comment}")
    return "\n".join(lines)


@main.command(
    "run",
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": False},
)
@click.argument("name", required=False)
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@out_option("Base directory: a run writes OUT/NAME/<timestamp>/.")
@dir_option(
    "--resume",
    "resume_dir",
    default=None,
    help="Continue the run in RUN_DIR from its last checkpoint (no NAME, no overrides).",
)
@quiet_option()
@threads_option("torch threads (a resumed run keeps its own).")
@click.option(
    "--help", "-h", "show_help", is_flag=True, help="Show this message (with NAME: its keys)."
)
@click.pass_context
def run_command(ctx, name, overrides, out, resume_dir, quiet, threads, show_help) -> None:
    """Run experiment NAME with config overrides --key=value (`bnlab list` names them).

    \b
    bnlab run fig1 --data_dir=/path/to/mnist   # a data_dir selects --dataset=mnist
    bnlab run lr --steps=500 --out=/tmp/runs
    bnlab run --resume runs/fig1/20250101-120000
    bnlab run fig1 --help          # the experiment's keys, types, defaults
    """
    from .lab.runner import resume

    with _lab_errors():
        if show_help:
            click.echo(_experiment_help(name) if name else ctx.get_help())
            return
        if resume_dir is not None:
            if name or overrides:
                raise click.UsageError(
                    "--resume RUN_DIR takes no experiment name or overrides: "
                    "a run resumes with the config it started with"
                )
            directory, report = resume(resume_dir, progress=not quiet)
        else:
            if not name:
                raise click.UsageError("name an experiment (bnlab list) or --resume RUN_DIR")
            if name.startswith("-"):
                raise click.UsageError(
                    f"expected an experiment name before the overrides, got {name!r}"
                )
            directory, report = _start(name, list(overrides), out, quiet, threads)
    click.echo(_text_report(report.markdown))
    click.echo(f"report: {directory / 'report.md'}")


def _text_report(markdown: str) -> str:
    return "\n".join(line for line in markdown.splitlines() if not line.startswith("!["))


@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report_command(run_dir: str) -> None:
    """(Re)write RUN_DIR's plots, report.md, summary.json and metrics from its saved files."""
    from pathlib import Path

    from .lab.runner import write_report

    with _lab_errors():
        report = write_report(Path(run_dir))
    click.echo(_text_report(report.markdown))
    click.echo(f"report: {Path(run_dir) / 'report.md'}")


@main.command("precise-bn")
@click.option(
    "--momentum",
    default=0.001,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="The BN layers' EMA momentum during training (small: the running statistics lag).",
)
@click.option("--steps", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--batches",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="Training batches of 60 that population_statistics averages over.",
)
@click.option("--seed", default=0, show_default=True, type=int)
def precise_bn(momentum: float, steps: int, batches: int, seed: int) -> None:
    """Test accuracy with lagging EMA statistics, then with Algorithm 2's exact ones.

    Trains the demo's BN sigmoid MLP on the bundled digits with the given momentum, then replaces
    the running statistics by bnlab.inference.population_statistics over training batches.
    """
    import torch

    from .data import load_digits
    from .inference import population_statistics
    from .lab.mlp import accuracy, sigmoid_mlp, train_classifier

    data = load_digits(seed=seed)
    torch.manual_seed(seed)
    model = sigmoid_mlp(data.num_features, data.num_classes, batch_norm=True)
    for module in model.modules():
        if hasattr(module, "momentum"):
            module.momentum = momentum
    before = train_classifier(model, data, steps, seed=seed, progress=True, label="training")
    generator = torch.Generator().manual_seed(seed + 1)
    sample = [
        data.train_x[torch.randint(len(data.train_y), (60,), generator=generator)]
        for _ in range(batches)
    ]
    report = population_statistics(model, sample)
    after = accuracy(model, data.test_x, data.test_y)
    click.echo(f"{steps} steps, BN momentum {momentum}")
    click.echo(f"test accuracy with the running (EMA) statistics: {before.test_accuracy:.4f}")
    click.echo(
        f"test accuracy with population statistics over {report.batches} batches: {after:.4f}"
    )


def _int_list(value: str, param_hint: Optional[str] = None) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {value!r}", param_hint=param_hint
        ) from None


@main.command("small-batch")
@click.option(
    "--batch-sizes",
    default="2,4,8,16,32,64,128",
    show_default=True,
    help="Examples per batch, comma-separated.",
)
@click.option("--seeds", default="0", show_default=True, help="Seeds, comma-separated.")
@click.option("--epochs", default=8, show_default=True, type=click.IntRange(min=1))
@out_option("Writes OUT/small-batch/<timestamp>/.")
@quiet_option()
def small_batch(batch_sizes: str, seeds: str, epochs: int, out: str, quiet: bool) -> None:
    """BN vs batch renorm vs ghost BN vs layer norm vs group norm across batch sizes.

    The same as `bnlab run small-batch --batch_sizes=... --seeds=... --epochs=...`.
    """
    sizes = _int_list(batch_sizes)
    if min(sizes) < 2:
        raise click.BadParameter("batch sizes must be >= 2", param_hint="--batch-sizes")
    overrides = {"batch_sizes": sizes, "seeds": _int_list(seeds), "epochs": epochs}
    directory, report = _start("small-batch", overrides, out, quiet, threads=1)
    click.echo(report.markdown)
    click.echo(f"written to {directory}")


@main.command("export")
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--to",
    "output",
    required=True,
    type=click.Path(dir_okay=False),
    help="The .onnx file to write.",
)
@click.option("--input-shape", required=True, help="Example input shape, e.g. 1,3,32,32.")
@click.option("--no-fold", is_flag=True, help="Export the batch norms as they are.")
def export_command(model_path: str, output: str, input_shape: str, no_fold: bool) -> None:
    """Fold MODEL_PATH's batch norms and export it to ONNX, checked in onnxruntime.

    MODEL_PATH is a whole model saved with torch.save(model); loading it unpickles Python
    objects, so only export files you trust.
    """
    import torch

    from .export import export_onnx

    shape = _int_list(input_shape, param_hint="--input-shape")
    model = _load_whole_model(model_path, "export")
    try:
        report = export_onnx(model.eval(), torch.randn(shape), output, fold_batch_norms=not no_fold)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    click.echo(str(report))


def _load_whole_model(model_path: str, purpose: str):
    """A whole nn.Module saved with torch.save(model) (unpickled: the caller trusts the file)."""
    import torch

    model = torch.load(model_path, weights_only=False, map_location="cpu")
    if not isinstance(model, torch.nn.Module):
        raise click.ClickException(
            f"{model_path} holds a {type(model).__name__}, expected a whole torch.nn.Module saved "
            f"with torch.save(model) (a state_dict has no architecture to {purpose})"
        )
    return model


@main.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--data",
    "source",
    required=True,
    help="'digits' (bundled), a directory with MNIST's IDX files, or a torch.save'd tensor file "
    "(inputs, an (inputs, labels) pair, or a dict with 'x' and 'y').",
)
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "train"]))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--batches", default=None, type=click.IntRange(min=1), help="Use the first N batches only."
)
@click.option(
    "--shape",
    default=None,
    help="Per-example shape to view the data's rows as, e.g. 1,8,8 for the digits.",
)
@click.option(
    "--stale-distance",
    default=0.2,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Running vs population statistics, in population standard deviations, above which "
    "a layer's statistics are stale.",
)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False))
@click.option(
    "--fix",
    "fix_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the model with population statistics recomputed where they are stale, never "
    "updated or non-finite (nothing else changed), and print the gap before and after.",
)
def doctor(
    model_path, source, split, batch_size, batches, shape, stale_distance, json_path, plot_path,
    fix_path,
) -> None:  # fmt: skip
    """Why is MODEL_PATH worse in eval mode? Diagnose its batch norms on some data.

    MODEL_PATH is a whole model saved with torch.save(model) (its classes importable here; it is
    unpickled: load only files you trust). Prints every batch norm's running vs population
    statistics, the findings with their fixes, and the eval vs population-statistics gap.
    """
    import torch

    from .data import load_batches
    from .doctor import diagnose, repair

    model = _load_whole_model(model_path, "diagnose")
    try:
        data = load_batches(
            source,
            split=split,
            batch_size=batch_size,
            max_batches=batches,
            shape=_positive_sizes(shape),
        )
    except ValueError as error:  # DatasetError included
        raise click.BadParameter(str(error), param_hint="--data / --shape") from None
    diagnosis = diagnose(model, data, stale_distance=stale_distance)
    click.echo(str(diagnosis))
    if json_path:
        with open(json_path, "w") as file:
            file.write(diagnosis.to_json())
    if plot_path:
        diagnosis.plot(plot_path)
    if fix_path:
        repaired = repair(model, diagnosis)
        after = diagnose(model, data, stale_distance=stale_distance, explain=False)
        torch.save(model, fix_path)
        click.echo(f"\nrepaired {len(repaired)} layer(s): {', '.join(repaired) or 'none'}")
        click.echo(f"before: {_gap_line(diagnosis.gap)}\nafter:  {_gap_line(after.gap)}")
        click.echo(f"wrote {fix_path}")


def _positive_sizes(text: Optional[str]) -> Optional[tuple[int, ...]]:
    shape = None if text is None else _int_list(text, param_hint="--shape")
    if shape is not None and min(shape) < 1:
        raise click.BadParameter(f"expected positive sizes, got {text!r}", param_hint="--shape")
    return shape


def _gap_line(gap: dict) -> str:
    line = f"eval vs population-statistics output gap {gap['output_gap']:.3g}"
    if "eval_accuracy" in gap:
        line += (
            f", accuracy {gap['eval_accuracy']:.2%} (population statistics: "
            f"{gap['population_accuracy']:.2%})"
        )
    return line


if __name__ == "__main__":  # python -m bnlab.cli
    main()
