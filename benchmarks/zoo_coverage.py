"""How much of timm's model zoo bnlab.convert takes over: normalization layers by class, per model.

    python benchmarks/zoo_coverage.py                  # every timm model; appends to
                                                       # benchmarks/results/zoo_coverage.csv
    python benchmarks/zoo_coverage.py --filter 'resnet*' --limit 20

Each model is built with ``pretrained=False`` on the meta device (no memory, no initialization:
only the module tree matters here), or on the CPU when it cannot be built on meta; a build that
takes more than ``--build-timeout`` seconds (default 10) is skipped and its row says so. Then
``bnlab.convert(model, report=True)`` runs on it. One row per (model, normalization class):
``layers`` found, ``converted`` by bnlab, the bnlab class they became and, for layers left, the
report's reason. A normalization layer is any subclass of torch.nn's ``_NormBase`` (batch and
instance norm), ``LayerNorm``, ``GroupNorm``, ``RMSNorm``, or a class of timm's normalization
modules (``timm.layers.norm``, ``norm_act``, ``evo_norm``, ...); ``family`` is ``batchnorm`` for
the batch-norm ones (a ``_BatchNorm`` subclass, or "BatchNorm" in the class name), else
``other``. A model with no normalization layer gets one row with an empty class.
"""

from __future__ import annotations

import argparse
import fnmatch
import signal
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the torchvision stand-in

import bnlab  # noqa: E402
from common import append_rows  # noqa: E402
from torchvision_standin import import_timm  # noqa: E402

TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
TIMM_NORM_MODULES = tuple(
    f"timm.layers.{m}"
    for m in ("norm", "norm_act", "evo_norm", "filter_response_norm", "grn", "inplace_abn")
)


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, TORCH_NORMS) or type(module).__module__ in TIMM_NORM_MODULES


def family(cls: type) -> str:
    batch = issubclass(cls, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in cls.__name__
    return "batchnorm" if batch else "other"


class BuildTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise BuildTimeout


def build(timm, name: str, timeout: int) -> tuple[nn.Module, str]:
    """The model on the meta device, else on the CPU; raises BuildTimeout past ``timeout`` s."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        try:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False), "meta"
        except BuildTimeout:
            raise
        except Exception:  # a model that computes tensors at build time
            return timm.create_model(name, pretrained=False), "cpu"
    finally:
        signal.alarm(0)


def rows_for(name: str, model: nn.Module) -> list[dict]:
    """Normalization layers of ``model`` by class, and what bnlab.convert made of them."""
    found = Counter(qualified(type(m)) for m in model.modules() if is_norm(m))
    families = {qualified(type(m)): family(type(m)) for m in model.modules() if is_norm(m)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report says the same
        _, report = bnlab.convert(model, report=True)
    rows = []
    for cls, layers in sorted(found.items()):
        done, left = report.converted.get(cls), report.left.get(cls)
        rows.append(
            dict(
                norm_class=cls,
                family=families[cls],
                layers=layers,
                converted=len(done.layers) if done else 0,
                bnlab_class=done.target if done else "",
                left_reason=left.note if left else "",
            )
        )
    return rows or [dict(norm_class="", family="", layers=0, converted=0)]


def survey(timm, names: list[str], timeout: int) -> list[dict]:
    rows = []
    for i, name in enumerate(names):
        start = time.perf_counter()
        try:
            model, device = build(timm, name, timeout)
        except BuildTimeout:
            rows.append(dict(model=name, status=f"skipped: build > {timeout} s"))
            continue
        except Exception as e:  # reported, not fatal: one model's bug is not the survey's
            rows.append(dict(model=name, status=f"failed: {type(e).__name__}: {e}"[:200]))
            continue
        seconds = round(time.perf_counter() - start, 2)
        for row in rows_for(name, model):
            rows.append(dict(model=name, status="ok", device=device, build_s=seconds, **row))
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{len(names)} models", flush=True)
    return rows


COLUMNS = (
    "model status device build_s norm_class family layers converted bnlab_class left_reason"
).split()


def summary(rows: list[dict]) -> str:
    """Totals by class, batch-norm family first."""
    layers, converted, models = Counter(), Counter(), Counter()
    for r in rows:
        if r.get("norm_class"):
            key = (r["family"], r["norm_class"])
            layers[key] += r["layers"]
            converted[key] += r["converted"]
            models[key] += 1
    lines = [f"{'family':9} {'layers':>7} {'converted':>9} {'models':>6}  class"]
    for key in sorted(layers, key=lambda k: (k[0] != "batchnorm", -layers[k])):
        lines.append(f"{key[0]:9} {layers[key]:7} {converted[key]:9} {models[key]:6}  {key[1]}")
    skipped = [r for r in rows if r["status"] != "ok"]
    lines.append(f"{len({r['model'] for r in rows})} models, {len(skipped)} not built:")
    lines += [f"  {r['model']}: {r['status']}" for r in skipped]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="*", help="fnmatch pattern over timm.list_models()")
    parser.add_argument("--limit", type=int, default=0, help="first N matching models (0: all)")
    parser.add_argument("--build-timeout", type=int, default=10, help="seconds per model build")
    parser.add_argument("--out", type=Path, default=None, help="CSV directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    timm = import_timm()
    names = fnmatch.filter(timm.list_models(), args.filter)
    names = names[: args.limit] if args.limit else names
    rows = survey(timm, names, args.build_timeout)
    rows = [{"timm": timm.__version__, **{c: r.get(c, "") for c in COLUMNS}} for r in rows]
    path = append_rows("zoo_coverage.csv", rows, args.out)
    print(summary(rows))
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
