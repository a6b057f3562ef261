"""torchrun integration: PyTorch's own DDP, nothing home-made."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> Dist:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives and FSDP's device mesh use the current device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available; use --device cpu")
    if name == "cuda":  # under torchrun, each rank its own GPU
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device(name)


def all_reduce_mean(value: float, d: Dist, device) -> float:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / d.world_size


def all_reduce_max(value: float, d: Dist, device) -> float:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# ---- FSDP2 ----------------------------------------------------------------------------------------
def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` has sharded the model's parameters (DTensors)."""
    from ..sparsity.sharding import is_sharded as sharded

    return any(sharded(p) for p in model.parameters())


def shard_model(model: torch.nn.Module, device: torch.device, dtype: str, d: Dist) -> torch.nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over all ranks: each transformer block (the
    classes the model lists in ``_no_split_modules``, as Hugging Face models do) is one unit, and the
    rest (embeddings, final norm, LM head) the root. On CUDA with bf16 the parameters are gathered in
    bf16 and gradients reduced in fp32. The model is sharded in place; build the optimizer and attach
    the sparsifier after this, on the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"FSDP needs the model's transformer blocks: {type(model).__name__} lists none in "
                         "_no_split_modules; use --parallel ddp")
    mesh = init_device_mesh(device.type, (d.world_size,))
    bf16 = device.type == "cuda" and dtype in ("auto", "bfloat16")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """An unsharded CPU copy of a sharded model on rank 0 (None on the other ranks), for
    ``save_pretrained``; every rank must call it (the weights are gathered)."""
    import transformers
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        copy = transformers.AutoModelForCausalLM.from_config(model.config)
    copy.load_state_dict(state, strict=False, assign=True)
    copy.tie_weights()
    for name, buffer in model.named_buffers():  # (not sharded; non-persistent ones, e.g. RoPE's, are not in the state)
        owner, _, leaf = name.rpartition(".")
        copy.get_submodule(owner).register_buffer(leaf, buffer.detach().cpu().clone(),
                                                   persistent=leaf not in copy.get_submodule(owner)._non_persistent_buffers_set)
    missing = [n for n, p in [*copy.named_parameters(), *copy.named_buffers()] if p.is_meta]
    if missing:
        raise RuntimeError(f"gathering the sharded model left {missing[:3]} unset")
    return copy.eval()
