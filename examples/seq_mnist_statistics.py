"""Why the row-by-row MNIST BN-LSTM lost 1-3 points in eval mode: how its population statistics
are estimated (the measurements behind docs/results/seq-mnist/diagnosis.md).

Trains the lab's BN-LSTM (``bnlab run seq-mnist`` settings: seed 0, the same mini-batches; the
state is saved to ``--state`` and reused), then measures test accuracy with:

- training mode on test batches of 100 (each batch's own statistics: what training optimized;
  transductive, for reference only);
- Algorithm 2: per-step averages of per-batch statistics over random training batches of 100;
- the same batches run through the net as one batch ("joint"): every step normalized with the
  statistics it stores, i.e. the values eval mode computes;
- joint statistics with the means of the h and c terms at steps 0-5 taken from Algorithm 2, and
  (a control) with the same differences in random order and sign.

    OMP_NUM_THREADS=1 python examples/seq_mnist_statistics.py --data_dir=MNIST_DIR --state=bnlstm.pt
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from bnlab.inference import population_statistics
from bnlab.lab.common import evaluate
from bnlab.lab.runner import seeded
from bnlab.lab.schedules import lr_at_step
from bnlab.lab.seq_mnist import ClippedRMSprop, SeqMnistConfig, build, sequence_data


def train(config: SeqMnistConfig, data) -> nn.Module:
    """The lab's BN-LSTM job (classifier_job's loop: same initialization and mini-batches)."""
    with seeded(config.seed):
        model = build("bnlstm", data, config)
    model.train()
    opt = ClippedRMSprop(model.parameters(), config.clip, lr=config.lr)
    g = torch.Generator().manual_seed(config.seed + 1)
    for i in range(1, config.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at_step(config, i)
        batch = torch.randint(len(data.train_y), (config.batch_size,), generator=g)
        loss = nn.functional.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % 1000 == 0:
            print(f"step {i:,}: loss {loss.item():.4f}", flush=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument(
        "--state", default="seq_mnist_bnlstm.pt", help="trained state (written if absent)"
    )
    parser.add_argument("--steps", type=int, default=12_000)
    parser.add_argument("--lr_drop_at", type=float, default=None)
    parser.add_argument("--bn_eps", type=float, default=1e-2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = SeqMnistConfig(
        dataset="mnist",
        data_dir=args.data_dir,
        steps=args.steps,
        lr_drop_at=args.lr_drop_at,
        bn_eps=args.bn_eps,
    ).resolve()
    data, _ = sequence_data(config)
    if Path(args.state).exists():
        model = build("bnlstm", data, config)
        model.load_state_dict(torch.load(args.state))
    else:
        model = train(config, data)
        torch.save(model.state_dict(), args.state)
    base = copy.deepcopy(model.state_dict())
    n = len(data.train_y)

    def test_accuracy() -> float:
        return evaluate(model, data.test_x, data.test_y)["test_accuracy"]

    def draw(seed: int, count: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [data.train_x[torch.randint(n, (100,), generator=g)] for _ in range(count)]

    with torch.no_grad():  # training mode, batches of 100 test images (running averages restored)
        order = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(0))
        correct = sum(
            int((model.train()(data.test_x[b]).argmax(1) == data.test_y[b]).sum())
            for b in order.split(100)
        )
        model.load_state_dict(base)
    print(f"training mode, test batches of 100:        {correct / len(data.test_y):.4f}")
    print(f"running averages (momentum 0.1):           {test_accuracy():.4f}")
    for count in (100, n // 100):
        accs = []
        for seed in range(3 if count < n // 100 else 1):
            model.load_state_dict(base)
            batches = draw(seed, count) if count < n // 100 else list(data.train_x.split(100))
            population_statistics(model, batches)
            accs.append(test_accuracy())
        print(f"Algorithm 2, {count} batches of 100:      " + "  ".join(f"{a:.4f}" for a in accs))
    for count in (10, 50, 100):
        accs = []
        for seed in range(3):
            model.load_state_dict(base)
            population_statistics(model, [torch.cat(draw(seed, count))])
            accs.append(test_accuracy())
        print(
            f"joint, {count * 100:,} images as one batch:  " + "  ".join(f"{a:.4f}" for a in accs)
        )

    batches = draw(0, 100)
    model.load_state_dict(base)
    population_statistics(model, batches)
    alg2 = copy.deepcopy(model.state_dict())
    model.load_state_dict(base)
    population_statistics(model, [torch.cat(batches)])
    joint = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    for shuffled in (False, True):
        state = copy.deepcopy(joint)
        for which in "hc":
            key = f"rnn.cells.0.running_mean_{which}"
            diff = alg2[key][:6] - joint[key][:6]
            if shuffled:
                diff = diff[:, torch.randperm(diff.shape[1])] * torch.randn(diff.shape).sign()
            state[key][:6] += diff
        model.load_state_dict(state)
        what = "the same differences, random order and sign" if shuffled else "Algorithm 2's"
        print(f"joint, h and c means of steps 0-5 {what}: {test_accuracy():.4f}")


if __name__ == "__main__":
    main()
