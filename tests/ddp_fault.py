"""`python tests/ddp_fault.py ARGS...`: the sdtorch CLI under torchrun with one rank's gradients dropped.

A DistributedDataParallel communication hook zeroes rank 1's gradient buckets before the all-reduce,
so every rank steps with half of the true mean gradient of rank 0's samples only: the fault a broken
gradient sync would cause. tests/test_training.py runs it to show that the 2-process comparison fails.
"""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import sdtorch.cli

_init = DistributedDataParallel.__init__


def _drop_rank_1(state, bucket):
    grads = bucket.buffer()
    if dist.get_rank() == 1:
        grads.zero_()
    grads.div_(dist.get_world_size())
    return dist.all_reduce(grads, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _patched(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.register_comm_hook(None, _drop_rank_1)


DistributedDataParallel.__init__ = _patched
torch.manual_seed(0)
sys.exit(sdtorch.cli.main(sys.argv[1:]))
