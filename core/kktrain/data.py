"""The order of the data: epochs as seeded permutations, batches of SampleKeys, exact positions.

The core, not the dataset, decides which sample comes when, so a resume lands on the exact batch
with any number of workers: position = (epoch, batches consumed). Knobs travel inside the keys,
so workers see curriculum changes without mutating a dataset object.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from kktrain.batch import to_device
from kktrain.task import SampleKey, is_keyed

if TYPE_CHECKING:
    from kktrain.config import DataConfig
    from kktrain.state import TrainState

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample (splitmix64 of the three numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & _MASK


class BatchPlan:
    """Batches of one epoch for this rank: a permutation from (seed, epoch), sharded, cut.

    Under several processes the permutation is dealt out in global batches: global batch ``g``
    is ``order[g*B*W : (g+1)*B*W]`` (batch size ``B``, world size ``W``) and rank ``r`` trains on
    its ``r``-th slice of ``B``. So after ``k`` batches per rank the epoch has consumed exactly the
    first ``k*B*W`` samples of its order, whatever ``W``: a resume on another world size starts
    its plan at that ``offset`` and continues with the very next sample.
    """

    def __init__(
        self, num_samples: int, batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = True,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = self.batches(0)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batches(self, offset: int = 0) -> int:
        """Batches per rank in an epoch whose first ``offset`` samples are already consumed."""
        per_rank = max(0, self.num_samples - offset) // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def indices(self, epoch: int, offset: int = 0) -> torch.Tensor:
        """This rank's sample indices for ``epoch`` from sample ``offset`` of its order, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        tail = order[offset:]
        ws, bs = self.world_size, self.batch_size
        if ws == 1:
            return tail
        per_rank = len(tail) // ws
        full = per_rank // bs
        mine = tail[: full * bs * ws].view(full, ws, bs)[:, self.rank].reshape(-1)
        rest = per_rank - full * bs  # a last, smaller batch of equal size on every rank (drop_last=False)
        if rest:
            start = full * bs * ws
            mine = torch.cat([mine, tail[start + self.rank * rest : start + (self.rank + 1) * rest]])
        return mine

    def consumed(self, offset: int, batches: int, world_size: int) -> int:
        """Samples of the epoch's order consumed at a position counted in ``world_size`` processes
        (a last, smaller batch of each rank included; the few samples no rank got are not)."""
        usable = max(0, self.num_samples - offset) // world_size * world_size
        return offset + min(usable, batches * self.batch_size * world_size)


class KeyBatchSampler:
    """The DataLoader's batch_sampler: yields the batches of an epoch from a position onwards.

    A batch is a list of int indices, or of :class:`SampleKey` for a keyed dataset
    (``keyed=True``). The loader iterates it in the main process; set
    ``epoch``/``start``/``knobs``/``skip`` before each ``iter(loader)``.
    """

    def __init__(self, plan: BatchPlan, *, keyed: bool = True, tensors: bool = False) -> None:
        self.plan = plan
        self.keyed = keyed
        self.tensors = tensors
        """Yield each batch's indices as a tensor (for datasets indexed by a whole batch at once)."""
        self.epoch = 0
        self.start = 0
        self.knobs: Mapping[str, Any] = {}
        self.skip: frozenset[int] = frozenset()
        self.offset = 0

    def __len__(self) -> int:
        return self.plan.batches(self.offset) - self.start

    def __iter__(self) -> Iterator[Any]:
        plan, epoch, knobs = self.plan, self.epoch, dict(self.knobs)
        bs = plan.batch_size
        end = plan.batches(self.offset)
        if self.tensors:
            order_t = plan.indices(epoch, self.offset)
            for b in range(self.start, end):
                if b not in self.skip:
                    yield order_t[b * bs : (b + 1) * bs]
            return
        order = plan.indices(epoch, self.offset).tolist()
        for b in range(self.start, end):
            if b in self.skip:
                continue
            idx = order[b * bs : (b + 1) * bs]
            if self.keyed:
                yield [SampleKey(i, sample_seed(plan.seed, epoch, i), knobs) for i in idx]
            else:
                yield idx


def identity_collate(items: Any) -> Any:
    """For datasets whose ``__getitems__`` already returns a whole batch."""
    return items


WORKER_TERM_GRACE_S = 60
"""How long a data-loader worker outlives a SIGTERM (its parent shuts it down well before)."""


def _worker_sigterm(signum: int, frame: Any) -> None:
    # `timeout`, Slurm and `kill -TERM -PGID` signal the whole process group: the main process
    # finishes its step, checkpoints and shuts the workers down itself. A worker dying now would
    # make torch's SIGCHLD handler raise in the middle of that checkpoint. The alarm (default
    # action: exit) bounds the worker's life should its parent never come for it.
    signal.alarm(WORKER_TERM_GRACE_S)


def _worker_init(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C and SIGTERM to the main process, which shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


class DataStream:
    """The training data as the loop sees it: batches at exact positions, restartable anywhere.

    It owns the batch sampler (and, with worker processes, the DataLoader) and reads the position
    (``epoch``, ``batch_in_epoch``, ``knobs``, ``skip_batches``) from the training state, so a
    resume, a rollback or a knob change only has to call :meth:`restart`: the next batch comes
    from the state's position with the state's knobs.

    Without workers (``data.workers = 0``) batches are fetched directly in the main process, as
    torch's single-process loader would (same items, same collate, same RNG use) but without its
    per-batch machinery; a ``TensorDataset`` with the default collate is indexed by the whole
    batch at once (``t[indices]`` is exactly what stacking the items gives), and a dataset with
    ``__getitems__`` gets the batch's indices in one call.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        seed: int,
        data: DataConfig,
        collate: Callable[[Any], Any],
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        default_collate: bool = False,
    ) -> None:
        self.dataset = dataset
        self.device = device
        self.collate = collate
        self.plan = BatchPlan(
            len(dataset), batch_size, seed=seed, shuffle=data.shuffle, drop_last=data.drop_last,
            rank=rank, world_size=world_size,
        )
        self.keyed = is_keyed(dataset)
        self.direct = data.workers == 0
        # Whole-batch indexing: a plain TensorDataset (not a subclass, which may override
        # __getitem__) collated by torch's default_collate, which stacks what t[i] gives.
        self.vectorized = self.direct and default_collate and type(dataset) is torch.utils.data.TensorDataset
        self.sampler = KeyBatchSampler(self.plan, keyed=self.keyed, tensors=self.vectorized)
        self.fetch_mode = "tensor-index" if self.vectorized else (
            "getitems" if hasattr(dataset, "__getitems__") else "per-item") + ("" if self.direct else f", {data.workers} workers")
        """How batches are fetched: ``tensor-index``, ``getitems`` or ``per-item`` (plus workers)."""
        pin = data.pin_memory if data.pin_memory != "auto" else device.type == "cuda"
        kwargs: dict[str, Any] = {}
        if data.workers > 0:
            kwargs["persistent_workers"] = data.persistent_workers
            if data.prefetch_factor is not None:
                kwargs["prefetch_factor"] = data.prefetch_factor
        self.loader: torch.utils.data.DataLoader[Any] | None = None
        if not self.direct:
            self.loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=self.sampler, num_workers=data.workers, pin_memory=bool(pin),
                collate_fn=collate,
                # Its own generator: creating an iterator must not draw from the global RNG, or a
                # resume (which creates one more iterator) would shift dropout and everything after.
                generator=torch.Generator().manual_seed(seed), worker_init_fn=_worker_init,
                **kwargs,
            )
        self.non_blocking = bool(pin) and not self.direct
        self.step_start: tuple[int, int, int, int] | None = None
        """``(step, epoch, batch_in_epoch, sample_offset)`` before the current step's batches were
        fetched: where a crash in the step puts the position back (:mod:`kktrain.crash`)."""
        self.last_positions: list[list[int]] = []
        """``[epoch, batch]`` of the batches the last step trained on (a rollback skips them)."""
        self._needs_restart = True
        self._iter: Iterator[Any] | None = None
        self._positions: Iterator[int] | None = None

    def __len__(self) -> int:
        """Batches per epoch (for this rank)."""
        return len(self.plan)

    def restart(self) -> None:
        """Continue from the state's position and knobs at the next batch."""
        self._needs_restart = True

    def next_batch(self, state: TrainState) -> tuple[int, Any] | None:
        """The next batch of the state's epoch with its position, or ``None`` at the epoch's end."""
        if self._needs_restart:
            sampler = self.sampler
            sampler.epoch, sampler.start, sampler.knobs = state.epoch, state.batch_in_epoch, state.knobs
            sampler.offset = state.sample_offset
            skip = frozenset(b for e, b in state.skip_batches if e == state.epoch)
            sampler.skip = skip
            end = self.plan.batches(state.sample_offset)
            self._positions = (b for b in range(state.batch_in_epoch, end) if b not in skip)
            self._iter = iter(self.loader) if self.loader is not None else self._direct_batches()
            self._needs_restart = False
        assert self._iter is not None and self._positions is not None
        try:
            batch = next(self._iter)
        except StopIteration:
            return None
        pos = next(self._positions)
        if self.device.type == "cpu":  # the loader already yields CPU tensors
            return pos, batch
        return pos, to_device(batch, self.device, self.non_blocking)

    def _direct_batches(self) -> Iterator[Any]:
        """Batches fetched in the main process: what torch's single-process loader would yield."""
        dataset, collate = self.dataset, self.collate
        if self.vectorized:
            tensors = dataset.tensors
            for idx in self.sampler:
                yield [t[idx] for t in tensors]  # default_collate turns the items' tuple into a list
        elif hasattr(dataset, "__getitems__"):
            for idx in self.sampler:
                yield collate(dataset.__getitems__(idx))
        else:
            for idx in self.sampler:
                yield collate([dataset[i] for i in idx])

    def next_step(self, state: TrainState, count: int) -> list[Any] | None:
        """``count`` batches for one optimizer step, or ``None`` at the epoch's end.

        Advances ``state.batch_in_epoch`` past them. A partial step at the epoch's end is
        dropped, like ``drop_last``.
        """
        self.step_start = (state.step, state.epoch, state.batch_in_epoch, state.sample_offset)
        batches, positions = [], []
        for _ in range(count):
            item = self.next_batch(state)
            if item is None:
                return None
            pos, batch = item
            batches.append(batch)
            positions.append([state.epoch, pos])
            state.batch_in_epoch = pos + 1
        self.last_positions = positions
        return batches

    def close(self) -> None:
        """Shut the loader's worker processes down now, cleanly.

        Left to interpreter exit, multiprocessing terminates the workers with SIGTERM and torch's
        SIGCHLD handler reports ``DataLoader worker ... killed by signal: Terminated``.
        """
        for it in (self._iter, getattr(self.loader, "_iterator", None)):
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._iter = None
        if self.loader is not None:
            self.loader._iterator = None  # persistent workers keep one
        self._needs_restart = True

    def epoch_exhausted(self, state: TrainState, per_step: int) -> bool:
        """Whether the state's epoch has no full step of ``per_step`` batches left (skips excluded)."""
        skipped = {b for e, b in state.skip_batches if e == state.epoch}
        left = sum(1 for b in range(state.batch_in_epoch, self.plan.batches(state.sample_offset)) if b not in skipped)
        return left < per_step

    def rebase(self, state: TrainState) -> list[list[int]]:
        """Re-count a position saved under another world size in this one (a resume on 1 or 3
        processes of a run saved with 2): the epoch continues at the same sample of its order,
        re-sharded. Batches of the epoch that a rollback excluded cannot be re-counted and are
        dropped from ``skip_batches``; they are returned. No-op for the same world size."""
        if state.world_size == self.plan.world_size:
            return []
        dropped = [list(p) for p in state.skip_batches if p[0] == state.epoch and p[1] >= state.batch_in_epoch]
        state.skip_batches = [list(p) for p in state.skip_batches if p[0] != state.epoch]
        state.sample_offset = self.plan.consumed(state.sample_offset, state.batch_in_epoch, state.world_size)
        state.batch_in_epoch = 0
        state.world_size = self.plan.world_size
        self.restart()
        return dropped
