"""Process groups and work sharding for torchrun and Slurm (decoupled.md §8.2).

- `init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and starts a
  process group: NCCL on GPU, gloo on CPU. Without those variables it is a no-op (one process), so every stage
  runs the same code with or without torchrun. `SLURM_PROCID` alone does NOT switch distributed mode on (the
  torchvision-reference pitfall of decoupled.md §8.1): use torchrun or srun with the torchrun variables.
- `shard` picks this process's share of a flat work list deterministically (`items[index::count]`), for ranks
  under torchrun or for array tasks under `sbatch --array` (`slurm_array_shard`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from utils.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def env_info() -> DistInfo:
    """Rank / world size / local rank from torchrun's variables (one process when they are absent)."""
    return DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA); returns this process's DistInfo.
    On CUDA the local rank selects the GPU, so pass `device_for(info, device)` on to the models."""
    info = env_info()
    if not info.enabled:
        return info
    if dist.is_initialized():
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    return info


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """The device of this rank: cuda:<local_rank> on GPU, the given device otherwise."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op for one process)."""
    if info.enabled and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    """Rank 0's Python object on every rank."""
    if not (info.enabled and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def slurm_array_shard() -> tuple[int, int] | None:
    """(index, count) of this task in a Slurm job array, or None outside one."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    count = _env_int("SLURM_ARRAY_TASK_COUNT", 0)
    if count <= 0:
        count = _env_int("SLURM_ARRAY_TASK_MAX", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0) + 1
    return _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0), max(count, 1)


def resolve_shard(shard_index: int | None, num_shards: int | None, info: DistInfo) -> tuple[int, int]:
    """Explicit --shard-index/--num-shards, else the Slurm array task, else the torchrun rank, else (0, 1)."""
    if (shard_index is None) != (num_shards is None):
        raise UserError("--shard-index and --num-shards go together")
    if shard_index is not None:
        index, count = shard_index, num_shards
    elif (arr := slurm_array_shard()) is not None:
        index, count = arr
    else:
        index, count = info.rank, info.world_size
    if count < 1 or not 0 <= index < count:
        raise UserError(f"shard index {index} is not in [0, {count})")
    return index, count


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """This shard's items: every count-th item starting at index (deterministic, no duplicates, no padding)."""
    return list(items[index::count])
