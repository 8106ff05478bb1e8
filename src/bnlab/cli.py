"""The ``bnlab`` command line."""

from __future__ import annotations

import time

import click


@click.group()
@click.version_option(package_name="bnlab")
def main() -> None:
    """bnlab: batch normalization done right, and a lab that shows why it works."""


@main.command()
@click.option("--steps", default=3000, show_default=True, type=click.IntRange(min=0),
              help="SGD steps for each network.")
@click.option("--lr", default=0.5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Learning rate, the same for both networks.")
@click.option("--batch-size", default=60, show_default=True, type=click.IntRange(min=2))
@click.option("--seed", default=0, show_default=True, type=int)
def demo(steps: int, lr: float, batch_size: int, seed: int) -> None:
    """Train the paper's sigmoid MLP with and without BN on the bundled 8x8 digits.

    Ioffe & Szegedy 2015, section 4.1: 3 hidden layers of 100 sigmoid units, small Gaussian init,
    softmax cross-entropy, mini-batches of 60. Prints both test accuracies.
    """
    import torch

    from .data import load_digits
    from .lab.mlp import sigmoid_mlp, train_classifier

    data = load_digits(seed=seed)
    click.echo(
        f"digits: {len(data.train_y)} train / {len(data.test_y)} test images of "
        f"{data.num_features} pixels; {steps} steps of SGD, lr {lr}, batch {batch_size}"
    )
    for label, batch_norm in (("without BN", False), ("with BN   ", True)):
        torch.manual_seed(seed)
        model = sigmoid_mlp(data.num_features, data.num_classes, batch_norm=batch_norm)
        start = time.perf_counter()
        result = train_classifier(model, data, steps, batch_size, lr, seed, progress=True,
                                  label=label.strip())
        click.echo(
            f"{label}: test accuracy {result.test_accuracy:.4f}  "
            f"(final training loss {result.final_loss:.4f}, {time.perf_counter() - start:.1f} s)"
        )


@main.command("precise-bn")
@click.option("--momentum", default=0.001, show_default=True, type=click.FloatRange(0, 1),
              help="The BN layers' EMA momentum during training (small: the running statistics lag).")
@click.option("--steps", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--batches", default=100, show_default=True, type=click.IntRange(min=1),
              help="Training batches of 60 that population_statistics averages over.")
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
    sample = [data.train_x[torch.randint(len(data.train_y), (60,), generator=generator)]
              for _ in range(batches)]
    report = population_statistics(model, sample)
    after = accuracy(model, data.test_x, data.test_y)
    click.echo(f"{steps} steps, BN momentum {momentum}")
    click.echo(f"test accuracy with the running (EMA) statistics: {before.test_accuracy:.4f}")
    click.echo(f"test accuracy with population statistics over {report.batches} batches: {after:.4f}")


def _int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@main.command("small-batch")
@click.option("--batch-sizes", default="2,4,8,16,32,64,128", show_default=True,
              help="Examples per batch, comma-separated.")
@click.option("--seeds", default="0", show_default=True, help="Seeds, comma-separated.")
@click.option("--epochs", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--out", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Writes OUT/small-batch/<timestamp>/.")
def small_batch(batch_sizes: str, seeds: str, epochs: int, out: str) -> None:
    """BN vs batch renorm vs ghost BN vs layer norm vs group norm across batch sizes."""
    from datetime import datetime
    from pathlib import Path

    from .lab.small_batch import SmallBatchConfig, run, write_outputs

    sizes = _int_list(batch_sizes)
    if min(sizes) < 2:
        raise click.BadParameter("batch sizes must be >= 2", param_hint="--batch-sizes")
    config = SmallBatchConfig(batch_sizes=sizes, seeds=_int_list(seeds), epochs=epochs)
    rows = run(config, progress=True)
    out_dir = Path(out) / "small-batch" / datetime.now().strftime("%Y%m%d-%H%M%S")
    report = write_outputs(rows, config, out_dir)
    click.echo(report.read_text())
    click.echo(f"written to {out_dir}")


@main.command("export")
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--to", "output", required=True, type=click.Path(dir_okay=False),
              help="The .onnx file to write.")
@click.option("--input-shape", required=True, help="Example input shape, e.g. 1,3,32,32.")
@click.option("--no-fold", is_flag=True, help="Export the batch norms as they are.")
def export_command(model_path: str, output: str, input_shape: str, no_fold: bool) -> None:
    """Fold MODEL_PATH's batch norms and export it to ONNX, checked in onnxruntime.

    MODEL_PATH is a whole model saved with torch.save(model); loading it unpickles Python
    objects, so only export files you trust.
    """
    import torch

    from .export import export_onnx

    try:
        shape = tuple(int(n) for n in input_shape.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {input_shape!r}",
                                 param_hint="--input-shape") from None
    model = torch.load(model_path, weights_only=False, map_location="cpu")
    if not isinstance(model, torch.nn.Module):
        raise click.ClickException(
            f"{model_path} holds a {type(model).__name__}, expected a whole nn.Module saved with "
            "torch.save(model) (a state_dict has no architecture to export)"
        )
    try:
        report = export_onnx(model.eval(), torch.randn(shape), output, fold_batch_norms=not no_fold)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    click.echo(str(report))
