"""distill: knowledge distillation from a frozen teacher into the run's model (the student).

    kktrain run --plugin distill -o distill.teacher=runs/teacher -o task.layers=2 -o task.d_model=64
    kktrain run --plugin distill -o distill.teacher=mypkg.models:pretrained -o distill.alpha=0.7
    kktrain run --plugin distill -o distill.teacher=runs/teacher -o distill.learn_temperature=true

The loss of every training step becomes

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task loss

over the positions the task names: ``task.distill_logits(output, batch)`` picks, from the model's
output, the logits that count (for the Latin task the hidden cells), as an (N, C) tensor. The
teacher runs the same task loss on the same batch, frozen, in eval mode, under ``torch.no_grad()``;
never ``torch.inference_mode()``: its logits are then divided by a temperature that may be a
learnable parameter, and autograd must be able to save them for backward. See README.md.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch
from pydantic import Field, model_validator

from kktrain import ConfigError, PluginOptions, hookimpl, load_model

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["DistillPlugin", "TeacherCache", "distill_loss", "kl_term", "teacher_logits"]

NAME = "distill"


class DistillOptions(PluginOptions):
    """``-o distill.KEY=VALUE`` / ``[plugins.distill]``."""

    teacher: str = "copy"
    """A kktrain run directory or checkpoint (the model is rebuilt from its saved task and options),
    ``module:factory`` (returns a ``torch.nn.Module``), or ``copy``: a frozen copy of the student as
    built (a self-distillation check; what the contract suite uses)."""
    weights: str = "auto"
    """Of a run or checkpoint: ``raw``, ``ema`` (the EMA plugin's average) or ``auto`` (a plugin's set when there is one)."""
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the distillation term; ``1 - alpha`` goes to the task's own loss."""
    temperature: float = Field(2.0, gt=0.0)
    """Softening temperature T (the starting value when it is learned)."""
    learn_temperature: bool = False
    """Make T a parameter trained with the student (its own optimizer group, no weight decay), clamped to the range."""
    temperature_min: float = Field(0.5, gt=0.0)
    temperature_max: float = Field(10.0, gt=0.0)
    cache: bool = False
    """Compute the teacher's logits once per sample, keep them on disk (``RUN/distill_cache.pt``) and reuse
    them; refused when the task's samples are not the same for an index in every epoch."""

    @model_validator(mode="after")
    def _range_holds_the_start(self) -> DistillOptions:
        if not self.temperature_min <= self.temperature <= self.temperature_max:
            raise ValueError(
                f"temperature {self.temperature} is outside [temperature_min {self.temperature_min}, "
                f"temperature_max {self.temperature_max}]: widen the range or change the temperature"
            )
        return self


def kl_term(student: torch.Tensor, teacher: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, the mean over rows of (N, C) logits.

    Entries that are ``-inf`` in the teacher (classes a position may not take, e.g. the Latin task's
    symbols outside the grid's size) have probability 0 and add nothing (no ``0 * inf``).
    """
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    p = log_p.exp()
    pointwise = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    rows = max(student.shape[0], 1)
    return pointwise.sum() / rows * (temperature * temperature)


def distill_loss(task_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                 temperature: torch.Tensor | float, alpha: float) -> torch.Tensor:
    """``alpha * T^2 * KL + (1 - alpha) * task_loss``."""
    return alpha * kl_term(student, teacher, temperature) + (1.0 - alpha) * task_loss


@contextlib.contextmanager
def _capture(module: torch.nn.Module, into: list[Any]) -> Iterator[None]:
    """Record ``module``'s forward outputs inside the block."""
    handle = module.register_forward_hook(lambda _m, _args, output: into.append(output))
    try:
        yield
    finally:
        handle.remove()


def teacher_logits(teacher: torch.nn.Module, trainer: Trainer, batch: Any,
                   grad_mode: Callable[[], Any] = torch.no_grad) -> torch.Tensor:
    """The teacher's logits of the positions that count: the task's loss run on the teacher (its value
    discarded), its output captured, ``task.distill_logits`` applied. ``no_grad``, never ``inference_mode``."""
    outputs: list[Any] = []
    with grad_mode(), _capture(teacher, outputs):
        trainer.task.loss(teacher, batch)
        if not outputs:
            raise ConfigError("plugin 'distill': the task's loss never called the teacher model: distill needs loss(model, batch) to run model(...)")
        return trainer.task.distill_logits(outputs[-1], batch)


class DistillPlugin:
    """Knowledge distillation: a frozen teacher's softened logits guide the student (alpha, T, learnable T)."""

    Options = DistillOptions

    def __init__(self, options: DistillOptions | None = None) -> None:
        self.options = options or DistillOptions()
        o = self.options
        self.teacher: torch.nn.Module | None = None
        self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(o.temperature)), requires_grad=o.learn_temperature)
        self.steps = 0
        self.last_kl: torch.Tensor | None = None
        self._outputs: list[Any] = []
        self.cache: TeacherCache | None = None
        self._indices: torch.Tensor | None = None
        self._knobs: Any = None
        self._micro = 0
        self._step_seen = -1

    @property
    def temperature(self) -> torch.Tensor:
        """T = exp(log T), clamped to [temperature_min, temperature_max]."""
        o = self.options
        return self.log_temperature.exp().clamp(o.temperature_min, o.temperature_max)

    # ------------------------------------------------------------------ set-up

    def _load_teacher(self, trainer: Trainer, model: torch.nn.Module) -> torch.nn.Module:
        spec = self.options.teacher
        if spec == "copy":
            return copy.deepcopy(model)
        path = Path(spec).expanduser()
        if path.exists():
            return load_model(path, weights=self.options.weights, task=None if ":" not in trainer.config.task else trainer.config.task)
        if ":" in spec:
            module_name, _, attr = spec.partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"plugin 'distill': teacher '{spec}' cannot be imported ({e}): give module:factory on the path") from None
            teacher = factory()
            if not isinstance(teacher, torch.nn.Module):
                raise ConfigError(f"plugin 'distill': teacher factory '{spec}' returned a {type(teacher).__name__}, not a torch.nn.Module")
            return teacher
        raise ConfigError(f"plugin 'distill': teacher '{spec}' is neither a run directory, a checkpoint nor module:factory: check -o distill.teacher")

    @hookimpl
    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        """Load the teacher, freeze it, put it on the device in eval mode; check the task can say its logits."""
        if not trainer.task.has("distill_logits"):
            raise ConfigError(
                f"plugin 'distill': task '{trainer.task.name}' has no distill_logits(output, batch): give it one that "
                "returns the (N, C) logits of the positions that count (docs: plugins/kktrain-distill/README.md)"
            )
        teacher = self._load_teacher(trainer, model).to(trainer.device)
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher = teacher
        self.log_temperature.data = self.log_temperature.data.to(trainer.device)
        n_teacher = sum(p.numel() for p in teacher.parameters())
        n_student = sum(p.numel() for p in model.parameters())
        trainer.log.info("distill_teacher", teacher=self.options.teacher, parameters=n_teacher, student_parameters=n_student,
                         temperature=self.options.temperature, learn_temperature=self.options.learn_temperature)

    @hookimpl(wrapper=True)
    def build_optimizer(self, trainer: Trainer, params: list[Any]) -> Any:
        """A learnable temperature gets its own group (no weight decay) in the run's optimizer."""
        optimizer = yield
        if self.options.learn_temperature:
            optimizer.add_param_group({"params": [self.log_temperature], "weight_decay": 0.0})
        return optimizer

    # ------------------------------------------------------------------ the loss

    @hookimpl(wrapper=True)
    def forward_loss(self, trainer: Trainer, batch: Any) -> Any:
        """The task's loss as computed (the student's output captured), mixed with the distillation term."""
        assert self.teacher is not None
        outputs = self._outputs
        outputs.clear()
        with _capture(trainer.model, outputs):
            task_loss = yield
        if not outputs:
            raise ConfigError("plugin 'distill': the task's loss never called the model: distill needs loss(model, batch) to run model(...)")
        student = trainer.task.distill_logits(outputs[-1], batch)
        outputs.clear()
        teacher = self._cached_teacher(trainer, batch, student) if self.cache is not None else None
        if teacher is None:
            teacher = teacher_logits(self.teacher, trainer, batch)
            if self.cache is not None:
                self.cache.store(self._indices, teacher)
        kl = kl_term(student, teacher, self.temperature)
        self.last_kl = kl.detach()
        self.steps += 1
        return self.options.alpha * kl + (1.0 - self.options.alpha) * task_loss

    @hookimpl
    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """``distill/kl`` and ``distill/temperature`` beside each training record (the sync of a log step)."""
        if record.get("kind") == "train" and self.last_kl is not None:
            record["distill/kl"] = float(self.last_kl)
            record["distill/temperature"] = float(self.temperature.detach())

    # ------------------------------------------------------------------ the cache

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """``cache``: check that samples are deterministic per index, then open (or reuse) the cache file."""
        if not self.options.cache:
            return
        dataset = trainer.data.dataset
        if getattr(dataset, "sample_keys", False):
            from kktrain import SampleKey

            knobs = dict(trainer.state.knobs)
            first = [trainer.task.collate(dataset.__getitems__([SampleKey(i, seed, knobs) for i in range(min(4, len(dataset)))])
                                          if hasattr(dataset, "__getitems__") else [dataset[SampleKey(i, seed, knobs)] for i in range(4)])
                     for seed in (12345, 54321)]
            if not _same(first[0], first[1]):
                raise ConfigError(
                    f"plugin 'distill': cache = true needs samples that are the same for an index in every epoch, and task "
                    f"'{trainer.task.name}' draws them from the sample key's seed (fresh samples, augmentation): drop distill.cache"
                )
        assert trainer.run_dir is not None
        self.cache = TeacherCache(Path(trainer.run_dir) / "distill_cache.pt", len(dataset), self.options.teacher)
        self._knobs = trainer.state.knobs
        trainer.log.info("distill_cache", path=str(self.cache.path), filled=self.cache.filled_count, samples=len(dataset))

    def _cached_teacher(self, trainer: Trainer, batch: Any, student: torch.Tensor) -> torch.Tensor | None:
        """The cached logits of this micro-batch's samples, or None (then computed live and stored)."""
        assert self.cache is not None
        st = trainer.state
        if st.step != self._step_seen:
            self._step_seen, self._micro = st.step, 0
        positions = trainer.data.last_positions
        self._indices = None
        if st.knobs is not self._knobs:  # a curriculum changed the samples: the cache no longer describes them
            trainer.log.warning("distill_cache_off", step=st.step, reason="the task's knobs changed; the teacher runs live from here")
            self.cache.save()
            self.cache = None
            return None
        if self._micro >= len(positions):
            return None
        epoch, pos = positions[self._micro]
        self._micro += 1
        plan = trainer.data.plan
        order = plan.indices(epoch, st.sample_offset)
        idx = order[pos * plan.batch_size:(pos + 1) * plan.batch_size]
        if len(idx) != student.shape[0]:  # not one row per sample (or a split batch): live
            return None
        self._indices = idx
        return self.cache.lookup(idx, student.device)

    @hookimpl
    def on_checkpoint(self, trainer: Trainer, path: str, kind: str) -> None:
        """The cache goes to disk with every checkpoint."""
        if self.cache is not None and trainer.is_main:
            self.cache.save()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The (learned) temperature and the step count."""
        return {"log_temperature": self.log_temperature.detach().cpu().clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, in place (the optimizer holds the parameter)."""
        with torch.no_grad():
            self.log_temperature.copy_(state["log_temperature"].to(self.log_temperature.device))
        self.steps = int(state["steps"])

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["distill"]``: teacher, alpha, the final temperature, steps, cache hits."""
        summary[NAME] = {"teacher": self.options.teacher, "alpha": self.options.alpha,
                         "temperature": float(self.temperature.detach()), "learn_temperature": self.options.learn_temperature,
                         "steps": self.steps}
        if self.cache is not None:
            self.cache.save()
            summary[NAME]["cache"] = {"hits": self.cache.hits, "misses": self.cache.misses, "filled": self.cache.filled_count}


def _same(a: Any, b: Any) -> bool:
    """Two collated batches hold equal tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


class TeacherCache:
    """The teacher's logits per sample index, (samples, C), with a filled mask; one file beside the run."""

    def __init__(self, path: Path, samples: int, teacher: str) -> None:
        self.path, self.samples, self.teacher = path, samples, teacher
        self.logits: torch.Tensor | None = None
        self.filled = torch.zeros(samples, dtype=torch.bool)
        self.hits = self.misses = 0
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("teacher") == teacher and int(saved.get("samples", -1)) == samples:
                self.logits, self.filled = saved["logits"], saved["filled"]

    @property
    def filled_count(self) -> int:
        """How many samples have their teacher logits."""
        return int(self.filled.sum())

    def lookup(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """The logits of samples ``idx`` when all are cached, else None."""
        if self.logits is not None and bool(self.filled[idx].all()):
            self.hits += 1
            return self.logits[idx].to(device, non_blocking=True)
        self.misses += 1
        return None

    def store(self, idx: torch.Tensor | None, logits: torch.Tensor) -> None:
        """Keep the logits of samples ``idx`` (one row each)."""
        if idx is None or logits.shape[0] != len(idx):
            return
        rows = logits.detach().float().cpu()
        if self.logits is None:
            self.logits = torch.zeros(self.samples, rows.shape[1])
        self.logits[idx] = rows
        self.filled[idx] = True

    def save(self) -> None:
        """Write the cache atomically (a temporary file, then rename)."""
        if self.logits is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save({"teacher": self.teacher, "samples": self.samples, "logits": self.logits, "filled": self.filled}, tmp)
        tmp.replace(self.path)
