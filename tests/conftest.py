"""Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors, so the whole
correctness grid covers them on every machine. The variable must be set before bnlab (and Triton)
are imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
