"""Training on several processes under torchrun: the strategy (ddp | fsdp), the process group,
gradient sync during accumulation, and elastic restarts.

``distributed.strategy``: ``auto`` is ``ddp`` under torchrun and ``none`` on one process. ``ddp``
wraps the model in ``DistributedDataParallel``; ``fsdp`` applies FSDP2's ``fully_shard`` to every
block of ``Task.checkpoint_blocks(model)`` (deepest first) and then to the root, so parameters,
gradients and optimizer state are sharded across the processes (docs/distributed.md). On one
process every strategy trains the plain model: there is nothing to sync or to shard.

torchrun restarts the whole group after a worker dies (``--max-restarts``); a restarted worker
(``TORCHELASTIC_RESTART_COUNT > 0``) resumes the run from its newest verified checkpoint with no
flag beyond the original command (:func:`elastic_resume`).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from kktrain.errors import ConfigError

if TYPE_CHECKING:
    from kktrain.config import DistributedConfig
    from kktrain.trainer import Trainer

_INITS = itertools.count()


def env_world() -> tuple[int, int]:
    """(rank, world size) as torchrun set them (0, 1 on a single process)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def restart_count() -> int:
    """How often torchrun has restarted this worker group (0 on the first attempt or without torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def elastic_resume(resume: str | None) -> str | None:
    """``auto`` for a worker that torchrun restarted (and was not told where to resume), else ``resume``."""
    if resume is None and restart_count() > 0:
        return "auto"
    return resume


def run_id() -> str | None:
    """torchrun's run id (``--rdzv-id``; a fresh uuid with ``--standalone``), the same on every worker and restart."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID")
    return rid if rid and env_world()[1] > 1 else None


def init_process_group(device: torch.device) -> None:
    """Join the process group torchrun describes: gloo on the CPU, NCCL on CUDA.

    Under torchrun's agent store (``TORCHELASTIC_USE_AGENT_STORE=True``, torch >= 2.4), the keys of
    this attempt go under a prefix of their own: a restarted group otherwise reads the dead
    attempt's gloo addresses from the store the agent keeps, and the rendezvous fails
    (pytorch#135712). The prefix also counts the inits of this process, so one process can train
    several runs in a row.
    """
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world_size = env_world()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        timeout = timedelta(seconds=int(os.environ.get("KKTRAIN_DIST_TIMEOUT_S", 1800)))
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"kktrain/attempt_{restart_count()}/init_{next(_INITS)}/", base)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend)


class Distributed:
    """The run's strategy and what it owns: the process group, the DDP wrapper or FSDP's mesh.

    ``strategy`` is what runs: ``none``, ``ddp`` or ``fsdp`` (``auto`` resolved). Plugins read
    ``trainer.distributed.strategy``; under FSDP the model's parameters are ``DTensor`` shards
    from the end of ``on_model_built`` on, so a plugin that keeps references to parameters takes
    them at ``on_train_start`` (or from ``trainer.params``).
    """

    def __init__(self, config: DistributedConfig, *, rank: int, world_size: int) -> None:
        self.config = config
        self.requested = config.strategy
        self.rank = rank
        self.world_size = world_size
        if world_size > 1 and config.strategy == "none":
            raise ConfigError(
                f"distributed.strategy = none under torchrun with {world_size} processes would train {world_size} "
                "separate models: use -o distributed.strategy=ddp (or fsdp), or launch one process"
            )
        self.strategy = "none" if world_size == 1 else ("ddp" if config.strategy == "auto" else config.strategy)
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.root: Any = None  # the FSDP root module
        self.mesh: Any = None
        self.param_dtype: torch.dtype | None = None
        self._checkpoint_group: Any = None

    @property
    def active(self) -> bool:
        """Whether gradients are synced across processes (ddp or fsdp)."""
        return self.strategy != "none"

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded (fsdp): state dicts hold ``DTensor`` shards."""
        return self.strategy == "fsdp"

    # -------------------------------------------------------------- set-up

    def init(self, device: torch.device) -> None:
        """Join the process group (under torchrun, when nobody did yet)."""
        import torch.distributed as dist

        if self.world_size > 1 and not dist.is_initialized():
            init_process_group(device)

    def request_mixed_precision(self, dtype: torch.dtype) -> bool:
        """Let the strategy run forward and backward in ``dtype``; ``True`` when it does (fsdp:
        ``MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=float32)``), ``False`` when the caller
        must autocast itself. Call it before the model is wrapped (``on_model_built``)."""
        if not self.sharded:
            return False
        self.param_dtype = dtype
        return True

    def wrap(self, trainer: Trainer, model: torch.nn.Module) -> torch.nn.Module:
        """What the forward runs through: the DDP wrapper, the FSDP-sharded model, or the model."""
        if self.strategy == "ddp":
            device = trainer.device
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
            return self.ddp
        if self.strategy == "fsdp":
            return self._shard(trainer, model)
        return model

    def _shard(self, trainer: Trainer, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.mesh = init_device_mesh(trainer.device.type, (self.world_size,))
        policy = (
            MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
            if self.param_dtype is not None else MixedPrecisionPolicy()
        )
        depth = {id(m): name.count(".") + 1 for name, m in model.named_modules() if name}
        blocks = [b for b in trainer.task.checkpoint_blocks(model) if b is not model and id(b) in depth]
        # Inner blocks first: fully_shard of a module takes the parameters not already sharded below it.
        blocks.sort(key=lambda b: -depth[id(b)])
        kwargs: dict[str, Any] = {"mesh": self.mesh, "mp_policy": policy,
                                  "reshard_after_forward": self.config.reshard_after_forward}
        seen: set[int] = set()
        for block in blocks:
            if id(block) not in seen and any(p.requires_grad for p in block.parameters()):
                seen.add(id(block))
                fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self.root = model
        trainer.log_event("fsdp", blocks=len(seen), world_size=self.world_size,
                          param_dtype=str(self.param_dtype).removeprefix("torch.") if self.param_dtype else "float32",
                          reshard_after_forward=self.config.reshard_after_forward)
        return model

    # -------------------------------------------------------------- the step

    @property
    def controls_sync(self) -> bool:
        """Whether accumulation needs :meth:`micro_batch` (a strategy that syncs gradients)."""
        return self.strategy != "none"

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around one micro-batch's forward+backward: sync gradients only on the ``last`` one.

        DDP: ``no_sync()`` before the last. FSDP: no reduce-scatter and no resharding between
        micro-batches (the gathered parameters stay until the last backward), as torch allows.
        """
        if self.ddp is not None:
            return contextlib.nullcontext() if last else self.ddp.no_sync()
        if self.root is not None:
            self.root.set_requires_gradient_sync(last)
            self.root.set_reshard_after_backward(last)
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float, foreach: bool | None) -> torch.Tensor:
        """``clip_grad_norm_``; under FSDP the total norm (a ``DTensor``) as a plain tensor, the same on every rank."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)
        if self.root is not None and hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm

    # -------------------------------------------------------------- checkpoints

    def checkpoint_group(self) -> Any:
        """A gloo group of its own for background checkpoint writes (every rank must call this the
        same number of times): sharing the training's group between two threads mixes up their
        collectives."""
        if self._checkpoint_group is None:
            import torch.distributed as dist

            self._checkpoint_group = dist.new_group(backend="gloo")
        return self._checkpoint_group

    # -------------------------------------------------------------- the end

    def release(self) -> None:
        """Drop the DDP wrapper: its reducer holds the process group, and torn down during
        interpreter shutdown, gloo's worker threads abort the process."""
        if self.ddp is not None:
            self.ddp = None
            gc.collect()

    def close(self, *, sync: bool) -> None:
        """Leave the process group (after a barrier when ``sync``: see ``Trainer.close``)."""
        import torch.distributed as dist

        self.release()
        if self.world_size > 1 and dist.is_initialized():
            if sync:
                dist.barrier()
            if self._checkpoint_group is not None:
                dist.destroy_process_group(self._checkpoint_group)
                self._checkpoint_group = None
            dist.destroy_process_group()

