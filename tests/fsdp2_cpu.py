"""`python -m ivl.finetune.sft` under FSDP2 on CPU processes (gloo), for tests/test_multigpu.py (run it with torchrun).

Accelerate forms FSDP groups only on accelerators: on CPU it always makes a plain multi-process group. This driver
declares the run FSDP2 once the Accelerator is built, so `prepare` shards the model with `fully_shard` on CPU (torch
supports that with gloo) and the kit's FSDP2 paths (gathered checkpoints, resume, export) run as they do on GPUs.
"""

import sys

from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import ivl.runtime
from ivl.finetune.sft import main


class CPUFSDP2Accelerator(Accelerator):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
        )
        self.state.distributed_type = DistributedType.FSDP


if __name__ == "__main__":
    ivl.runtime.Accelerator = CPUFSDP2Accelerator
    sys.exit(main())
