"""4D parallelism for herd models, applied from outside the model (see parallelize.py).

FSDP2 / HSDP, tensor + sequence + loss parallel, pipeline parallel, all-gather-K/V context
parallel, activation checkpointing, per-block compile and torchao float8, all on
`torch.distributed`; `plan.py` sizes a layout without hardware and `mfu.py` estimates the MFU it
reaches.
"""

from herd.parallel.dims import MESH_DIMS, Meshes, ParallelDims
from herd.parallel.parallelize import (
    ParallelConfig,
    ParallelModel,
    StepLoss,
    build_parallel_model,
    parallelize,
)

__all__ = [
    "MESH_DIMS", "Meshes", "ParallelConfig", "ParallelDims", "ParallelModel", "StepLoss", "build_parallel_model",
    "parallelize",
]
