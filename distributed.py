"""torch.distributed for train.py: process group, FSDP2 sharding, activation checkpointing, reductions,
and work done by each machine's local rank 0 first (downloads) while the other ranks wait.

One code path for every set-up: `python train.py` is world size 1 (no process group, plain
modules on CPU); `torchrun --nproc_per_node N train.py` initialises NCCL on GPUs or gloo on CPU
and shards every model with FSDP2 (`fully_shard`) per transformer block, then `lm_head`, then the
root, as torchtune's `shard_model` does. FSDP2 shards each parameter, so frozen base weights and
trainable LoRA weights can share a unit (FSDP1's flat parameters need one `requires_grad` per
unit). On GPU, a single process is sharded too (world size 1), so that the frozen base can stay
in bf16 while FSDP's mixed precision computes the float32 LoRA weights (their own master copies)
in bf16 and reduces their gradients in fp32.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size, its device, whether models get sharded, and
    its rank on this machine (local rank 0 downloads for the machine)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    shard: bool = False
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes files, logs and shows progress."""
        return self.rank == 0


def use_cuda(device: str) -> bool:
    """--device: "auto" takes CUDA when torch sees a GPU; "cuda" insists on one; "cpu" never."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is "
                         "False): install the CUDA build of torch (README, Set-up) or pass --device cpu")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def setup(device: str = "auto", timeout_s: float = 600.0) -> Dist:
    """Initialise the process group under torchrun (RANK in the environment), else a single process,
    on the device `device` names (see use_cuda).

    The timeout bounds how long a rank waits in a collective for a peer that died: torchrun then
    tears the group down instead of hanging.
    """
    cuda = use_cuda(device)
    if "RANK" not in os.environ:
        if cuda:  # FSDP (for bf16 base + fp32 LoRA) needs a process group, here of one process
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
            return Dist(device=torch.device("cuda"), shard=True)
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), device, shard=True, local_rank=local_rank)


def teardown() -> None:
    if in_process_group():
        dist.destroy_process_group()


def in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0 of the process group, or the only process: the one that writes what every rank
    computed. `Dist.main` answers the same for code that holds a `Dist`; this is for code that
    is given none (lora.save_adapter)."""
    return not in_process_group() or dist.get_rank() == 0


def all_reduce_sum(values: list[float], env: Dist) -> list[float]:
    """Sums of `values` over ranks (float64, so token counts stay exact)."""
    if env.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def first_message(message: str | None, env: Dist, timeout_s: float | None = None) -> str | None:
    """The first rank's message that is not None (in rank order), on every rank: a collective,
    so a failure on one rank ends every rank with the same words instead of a hang.

    `timeout_s` replaces the process group's timeout for this wait (through a gloo group of its
    own), for ranks that wait on slow work such as a download; a rank that dies meanwhile still
    ends the others, as torchrun stops every worker when one fails."""
    if env.world == 1:
        return message
    group = (dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
             if timeout_s is not None else None)
    messages: list[str | None] = [None] * env.world
    dist.all_gather_object(messages, message, group=group)
    if group is not None:
        dist.destroy_process_group(group)
    return next((m for m in messages if m is not None), None)


class PeerFailed(OSError):
    """Another rank failed in work this rank waited for; the message is that rank's error."""


def local_rank_0_first(work: Callable[[bool], None], env: Dist, timeout_s: float) -> None:
    """`work(False)` on each machine's local rank 0 while the other ranks wait (up to
    `timeout_s`), then `work(True)` on the others: a download, then reading what it fetched. When
    a local rank 0 fails, it raises its error and every other rank PeerFailed with its message."""
    failure, message = None, None
    if env.local_rank == 0:
        try:
            work(False)
        except Exception as e:  # any failure: the waiting ranks get its message, this rank raises it
            failure, message = e, str(e)
    message = first_message(message, env, timeout_s)
    if failure is not None:
        raise failure
    if message is not None:
        raise PeerFailed(message)
    if env.local_rank != 0:
        work(True)


def barrier(env: Dist) -> None:
    if env.world > 1:
        dist.barrier()


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass instead of storing its activations.

    The block's `forward` is wrapped in place (no wrapper module), so parameter names, and with
    them the adapter's PEFT keys, do not change. Call before `shard`, as torchtune's
    `_setup_model` does, so that checkpointing wraps the block FSDP2 then shards.
    """
    for layer in model.model.layers:
        inner = layer.forward
        layer.forward = lambda *args, _f=inner, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def shard(model: nn.Module, env: Dist) -> nn.Module:
    """FSDP2 per transformer block, then the root (embeddings, final norm, lm_head).

    `hidden_states` is registered as a forward method, so calling it (rather than forward)
    gathers the root's parameters; the root keeps them gathered after its forward
    (reshard_after_forward=False) until its backward ends, so the chunked MUSCLE loss can call
    `lm_head` once per chunk without any collective: ranks may have different numbers of chunks.
    On GPU the parameters are computed in bf16 and gradients reduced in fp32; trainable
    parameters should be fp32 already.
    """
    if not env.shard:
        return model.to(env.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(env.device.type, (env.world,))
    policy = MixedPrecisionPolicy()
    if env.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU, contiguous (as safetensors writes it); a sharded DTensor is
    gathered (every rank must call)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().contiguous()


@torch.no_grad()
def load_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole CPU tensor into `target`, which may be a sharded DTensor (this rank's shard)."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(target.device_mesh.device_type), target.device_mesh,
                                 target.placements)
    target.copy_(full.to(dtype=target.dtype))
