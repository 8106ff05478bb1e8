"""Inference latency of a network as trained, frozen and folded (bnlab.inference), on the CPU.

    python benchmarks/fold_speed.py            # appends to benchmarks/results/fold_speed.csv
    python benchmarks/plot_fold_speed.py       # draws benchmarks/results/fold_speed.png

Providers, each run side by side in one process on the same inputs:
  bnlab-bn  the eval-mode model with bnlab batch norms
  torch-bn  the same model converted back to torch.nn batch norms (bnlab.revert)
  frozen    every BN replaced by a FrozenBatchNorm (bnlab.inference.freeze)
  folded    every BN folded into its neighbouring layer (bnlab.inference.fold)
"""

from __future__ import annotations

import copy

import torch

import bnlab
from bnlab.inference import fold, freeze
from bnlab.lab.models import SmallResNet, bn_mlp
from common import append_rows, time_ms

CASES = [  # (model name, builder, input shape)
    ("resnet-32x32", lambda: SmallResNet(), (1, 3, 32, 32)),
    ("resnet-32x32", lambda: SmallResNet(), (32, 3, 32, 32)),
    ("mlp-784-512x3", lambda: bn_mlp(), (1, 784)),
    ("mlp-784-512x3", lambda: bn_mlp(), (256, 784)),
]


def randomize_statistics(model: torch.nn.Module) -> None:
    """Move every BN away from the identity so the comparison does real work."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, bnlab.nn.BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g))


def providers(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    folded, report = fold(model, x)
    assert report.max_abs_error < 1e-4, report
    return {
        "bnlab-bn": model,
        "torch-bn": bnlab.revert(copy.deepcopy(model)),
        "frozen": freeze(copy.deepcopy(model)),
        "folded": folded,
    }


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name, build, shape in CASES:
        model = build().eval()
        randomize_statistics(model)
        x = torch.randn(shape)
        for provider, net in providers(model, x).items():
            stats = time_ms(lambda: net(x))
            rows.append(
                {
                    "model": name,
                    "input": "x".join(map(str, shape)),
                    "provider": provider,
                    **{k: round(v, 4) for k, v in stats.items()},
                }
            )
            print(
                f"{name:14s} {str(shape):18s} {provider:9s} median {stats['median_ms']:.3f} ms "
                f"(p20 {stats['p20_ms']:.3f}, p80 {stats['p80_ms']:.3f})"
            )
    print("appended to", append_rows("fold_speed.csv", rows))


if __name__ == "__main__":
    main()
