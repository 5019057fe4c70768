"""One training on several processes: who this process is, how the processes talk, how the model
is sharded across them, and the few collectives the trainer needs.

Workers are started by `workers.py` (local processes, or `srun` inside a SLURM allocation); each
learns its place from the environment: RANK/WORLD_SIZE/LOCAL_RANK (set by our launcher or by
torchrun) or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (set by srun). The model is sharded with
PyTorch's FSDP2 (`fully_shard`) one decoder layer at a time, then at the root; `hybrid` shards
inside a node and replicates across nodes (HSDP, a 2-D device mesh).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from xffl_cwl.contract.layout import NNODES_ENV, WORKER_ENV
from xffl_cwl.errors import InputError

RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits longer means a rank is gone


@dataclass(frozen=True)
class World:
    """This process's place among the workers of one training."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    nnodes: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return None


def world_from_env() -> World:
    """The world a worker was started in; a process not started as a worker is a world of one."""
    if os.environ.get(WORKER_ENV) != "1":
        return World()
    size = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    nnodes = _env_int(NNODES_ENV, "SLURM_JOB_NUM_NODES") or 1
    if not 0 <= rank < size:
        raise InputError(f"worker rank {rank} is outside a world of {size}; start workers with xffl-cwl train")
    return World(rank, local, size, nnodes)


def pick_backend(name: str, device: torch.device) -> str:
    """NCCL on NVIDIA GPUs (RCCL on AMD: ROCm builds of torch answer to "nccl"), gloo on CPU."""
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise InputError("--backend nccl needs GPUs, and torch sees none here; use --backend gloo or auto")
    return name


def worker_device(world: World, name: str) -> torch.device:
    """Each worker gets the GPU of its local rank; on CPU they share the node."""
    from xffl_cwl.learning.devices import pick_device

    device = pick_device(name)
    if device.type == "cuda" and world.distributed:
        if world.local_rank >= torch.cuda.device_count():
            raise InputError(
                f"worker {world.rank} has local rank {world.local_rank} but this node has "
                f"{torch.cuda.device_count()} GPU(s); lower the processes per node"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def start(world: World, backend: str, device: torch.device) -> None:
    import torch.distributed as dist

    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=RENDEZVOUS_TIMEOUT, **kwargs)


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def decoder_layer_classes(model) -> set[str]:
    """The model's own unit of sharding: the classes it declares it must not split (its decoder
    layers: LlamaDecoderLayer, Qwen2DecoderLayer, ...), found from the model, not from a table."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    if not names:
        raise InputError(
            f"{type(base).__name__} declares no decoder layer class (_no_split_modules); it cannot be sharded"
        )
    return names


def resolve_sharding(sharding: str, world: World) -> str:
    """`auto`: shard inside a node and replicate across nodes when there are several, else shard fully."""
    if sharding == "auto":
        return "hybrid" if world.nnodes > 1 else "full"
    if sharding == "hybrid" and world.size % world.nnodes:
        raise InputError(f"--sharding hybrid needs the same number of workers on each of the {world.nnodes} nodes")
    return sharding


def shard(model, world: World, sharding: str, precision: str, device: torch.device):
    """Shard every decoder layer, then the rest; parameters stay fp32 master weights, bf16 computes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kind = resolve_sharding(sharding, world)
    if kind == "hybrid":
        mesh = init_device_mesh(
            device.type, (world.nnodes, world.size // world.nnodes), mesh_dim_names=("replicate", "shard")
        )
    else:
        mesh = init_device_mesh(device.type, (world.size,), mesh_dim_names=("shard",))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16"
        else MixedPrecisionPolicy()
    )
    layers = decoder_layer_classes(model)
    model.to(device)
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return kind


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter whole on every rank (a collective: every rank must ask for the same one)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sum_all(values: list[float], world: World) -> list[float]:
    """Element-wise sums over the ranks (fp64, so the order of ranks hardly matters)."""
    if not world.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()
