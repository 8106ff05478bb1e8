"""Data-parallel training with synchronized batch norm: DDP + bnlab.convert_sync_batchnorm.

A small ResNet (bnlab.lab.models.SmallResNet) learns the 8x8 handwritten digits that ship with
bnlab. Every rank trains on its own shard of the training set (DistributedSampler); the batch-norm
layers are converted to :class:`bnlab.nn.SyncBatchNorm`, so their statistics are those of the global
batch (all ranks' rows together), exactly as one process on the whole batch would compute them.

One machine, two processes (gloo on the CPU; NCCL with one GPU per process when CUDA is present)::

    torchrun --nproc_per_node=2 examples/ddp_train.py --epochs 5 --batch-size 32 --lr 0.05

Several machines: run the same command on each, with torchrun's own flags saying which node it is
(node 0's address as the master; 0 .. nnodes-1 as node_rank)::

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=2 \\
        --master_addr=10.0.0.1 --master_port=29500 examples/ddp_train.py
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=2 \\
        --master_addr=10.0.0.1 --master_port=29500 examples/ddp_train.py

Rank 0 prints the training loss of each epoch (averaged over all ranks' rows) and the final test
accuracy (every rank evaluates a slice of the test set; the counts are summed).
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import bnlab
from bnlab.data import load_digits
from bnlab.lab.models import SmallResNet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per rank and step")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--width", type=int, default=8, help="channels of the ResNet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a SyncBatchNorm layer waits for the other ranks before failing",
    )
    return parser.parse_args()


def setup() -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ... in the env)."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def build_model(args: argparse.Namespace, device: torch.device) -> DistributedDataParallel:
    torch.manual_seed(args.seed)  # the same start everywhere (DDP also broadcasts rank 0's)
    model = SmallResNet(in_channels=1, width=args.width, blocks=1, classes=10)
    model = bnlab.convert_sync_batchnorm(model, timeout=args.timeout).to(device)
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def train_epoch(model, loader, optimizer, device) -> float:
    """One pass over this rank's shard; returns the mean loss over every rank's rows."""
    model.train()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, rows)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients; SyncBatchNorm's came from global statistics
        optimizer.step()
        total += torch.stack([loss.detach().double() * len(y), torch.tensor(len(y), device=device)])
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def test_accuracy(model: DistributedDataParallel, x, y, device) -> float:
    """Eval mode (running statistics, no communication in the layers) on a slice per rank."""
    module = model.module.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = x[rank::world].to(device), y[rank::world].to(device)
    counts = torch.tensor(
        [(module(x).argmax(1) == y).sum().item(), len(y)], dtype=torch.float64, device=device
    )
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


def main() -> None:
    args = parse_args()
    device = setup()
    try:
        train(args, device)
    finally:
        # DDP's reducer holds the process group in reference cycles: free it before destroying the
        # group (without this, gloo sometimes aborted at interpreter exit, "terminate called
        # without an active exception", in about a third of runs on torch 2.13)
        gc.collect()
        dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    digits = load_digits(seed=args.seed)
    train_x, test_x = (t.view(-1, 1, 8, 8) for t in (digits.train_x, digits.test_x))  # (n, 1, 8, 8)
    train = TensorDataset(train_x, digits.train_y)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    model = build_model(args, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if rank == 0:
        layers = sum(isinstance(m, bnlab.nn.SyncBatchNorm) for m in model.modules())
        print(
            f"{world} ranks on {device.type}, {layers} SyncBatchNorm layers, "
            f"{len(train)} training rows, {len(loader)} steps per epoch",
            flush=True,
        )
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
        start = time.perf_counter()
        loss = train_epoch(model, loader, optimizer, device)
        if rank == 0:
            print(
                f"epoch {epoch}/{args.epochs}  train loss {loss:.4f}  "
                f"({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    accuracy = test_accuracy(model, test_x, digits.test_y, device)
    if rank == 0:
        print(f"test accuracy: {accuracy:.4f}", flush=True)


if __name__ == "__main__":
    main()
