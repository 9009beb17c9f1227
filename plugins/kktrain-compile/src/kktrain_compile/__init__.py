"""compile: ``torch.compile`` the model in place, falling back to eager with a warning when it fails.

    kktrain run --plugin compile                                  # inductor, mode "default"
    kktrain run --plugin compile -o compile.mode=max-autotune
    kktrain run --plugin compile -o compile.backend=aot_eager     # any torch._dynamo backend name

At ``on_model_built`` (``trylast``: after grad-checkpoint has wrapped its blocks) the model's
``forward`` is replaced, as an instance attribute, by ``torch.compile(model.forward, ...)``:
parameters, modules and state-dict keys are unchanged, so checkpoints load into plain models.
(``nn.Module.compile()`` would do the same through ``_call_impl``, but in torch 2.13 it compiles
nothing for built-in modules such as ``nn.Sequential``: dynamo skips both frames, pytorch#150915.)
Compilation happens lazily at the first forward; a compile error there (or at the recompile for
validation) restores the eager forward, logs a warning with the reason, and the core retries the
step. On CPU, ``cpp_wrapper`` and ``onednn`` become inductor options of this compile (hardware profiles
set them); ``onednn`` also sets ``torch.backends.mkldnn.enabled``, restored at the end of the run. See ``docs/plugins/compile.md``.
"""

from __future__ import annotations

from typing import Any, Literal, TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from kktrain import PluginError, PluginOptions, StepRetry, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["CompilePlugin", "is_compile_error"]


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` came from dynamo or a backend compiler (not from the model's own code)."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(error, TorchDynamoException)


def _reason(error: BaseException) -> str:
    """One line: the error's type and first line, and the backend's own error when dynamo wraps one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    inner = getattr(error, "inner_exception", None)
    if inner is not None:
        inner_lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
        text = f"{text} {type(inner).__name__}: {inner_lines[0] if inner_lines else ''}"
    elif text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return f"{type(error).__name__}: {text}"[:300]


class CompilePlugin:
    """torch.compile the model in place (modes, backend, CPU inductor flags); eager fallback on failure."""

    class Options(PluginOptions):
        """``-o compile.KEY=VALUE`` / ``[plugins.compile]``."""

        model_config = ConfigDict(strict=True)

        mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
        """Inductor mode (ignored by other backends)."""
        backend: str = Field("inductor", min_length=1)
        """A ``torch._dynamo`` backend name (``torch._dynamo.list_backends()``): inductor, aot_eager, eager ..."""
        fullgraph: bool = False
        """Fail (and fall back) on any graph break instead of compiling the pieces."""
        dynamic: bool | None = None
        """Dynamic shapes: ``None`` lets dynamo decide after the first shape change."""
        cpp_wrapper: bool | None = None
        """CPU, inductor: the ``cpp_wrapper`` option (a C++ launcher instead of Python); None leaves inductor's default."""
        onednn: bool | None = None
        """CPU, inductor: oneDNN on or off (``torch.backends.mkldnn.enabled`` and inductor's ``cpp.weight_prepack``)."""
        fallback: bool = True
        """On a compile error train eagerly with a warning; false: stop the run with the error."""

    def __init__(self, options: CompilePlugin.Options | None = None) -> None:
        self.options = options or self.Options()
        self.status = "not built"
        self.fallback_reason: str | None = None
        self._model: torch.nn.Module | None = None
        self._had_forward = False
        self._eager_forward: Any = None
        self._saved_globals: list[tuple[Any, str, Any]] = []

    # ------------------------------------------------------------------ set-up

    def _cpu_flags(self, trainer: Trainer) -> dict[str, Any]:
        """Inductor options for ``cpp_wrapper``/``onednn`` (CPU only); oneDNN's global switch is set here."""
        o = self.options
        if o.cpp_wrapper is None and o.onednn is None:
            return {}
        if trainer.device.type != "cpu":
            trainer.log.info("compile_cpu_flags_ignored", device=str(trainer.device), note="cpp_wrapper/onednn apply on CPU only")
            return {}
        flags: dict[str, Any] = {}
        if o.cpp_wrapper is not None:
            flags["cpp_wrapper"] = o.cpp_wrapper
        if o.onednn is not None:
            flags["cpp.weight_prepack"] = o.onednn
            self._saved_globals.append((torch.backends.mkldnn, "enabled", torch.backends.mkldnn.enabled))
            torch.backends.mkldnn.enabled = o.onednn  # type: ignore[assignment]  # a module-level flag
        return flags

    @hookimpl(trylast=True)
    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        """Replace ``model.forward`` by its compiled version (compilation itself is lazy)."""
        o = self.options
        self._model = model
        self._had_forward = "forward" in model.__dict__
        self._eager_forward = model.__dict__.get("forward")
        kwargs: dict[str, Any] = {"backend": o.backend, "fullgraph": o.fullgraph, "dynamic": o.dynamic}
        flags = self._cpu_flags(trainer) if o.backend == "inductor" else {}
        if o.backend == "inductor" and flags:
            # Per-compile options, not torch._inductor.config globals: they are part of the compiled
            # function's identity, so a second run in the same process does not reuse stale code.
            from torch._inductor import list_mode_options

            kwargs["options"] = {**list_mode_options(o.mode), **flags}
        elif o.backend == "inductor" and o.mode != "default":
            kwargs["mode"] = o.mode
        elif o.mode != "default" or o.cpp_wrapper is not None or o.onednn is not None:
            trainer.log.info("compile_options_ignored", backend=o.backend, note="mode, cpp_wrapper and onednn apply to inductor only")
        # A fresh dynamo cache per run: a process that trains several models (tests, sweeps) would
        # otherwise reach dynamo's recompile limit (8 per code object) and silently run eagerly.
        torch.compiler.reset()
        try:
            compiled = torch.compile(model.forward, **kwargs)
        except Exception as e:  # noqa: BLE001 - an unknown backend, a bad combination of options
            self._fall_back(trainer, e, where="set-up")
            return
        model.forward = compiled
        self.status = "compiled"
        event = {"cpp_wrapper": flags["cpp_wrapper"]} if "cpp_wrapper" in flags else {}
        if "cpp.weight_prepack" in flags:
            event["onednn"] = flags["cpp.weight_prepack"]
        trainer.log_event("compile", backend=o.backend, mode=o.mode, fullgraph=o.fullgraph, dynamic=o.dynamic, **event)

    def _restore_eager(self) -> None:
        model = self._model
        if model is None:
            return
        if self._had_forward:
            model.forward = self._eager_forward
        else:
            model.__dict__.pop("forward", None)

    def _fall_back(self, trainer: Trainer, error: BaseException, *, where: str) -> None:
        if not self.options.fallback:
            self._restore_globals()
            raise PluginError(
                f"compile (backend {self.options.backend}) failed at {where}: {_reason(error)}: "
                "fix the compile options or set compile.fallback=true to train eagerly"
            ) from error
        self._restore_eager()
        self.status = "eager (fallback)"
        self.fallback_reason = _reason(error)
        trainer.log.warning("compile_fallback", where=where, backend=self.options.backend, reason=self.fallback_reason,
                            note="torch.compile failed; training continues in eager mode")
        trainer.log_event("compile_fallback", where=where, reason=self.fallback_reason)

    # ------------------------------------------------------------------ failures at the first (re)compile

    @hookimpl(tryfirst=True)
    def on_step_exception(self, trainer: Trainer, error: BaseException, attempt: int) -> StepRetry | None:
        """A compile error in forward or backward: go eager and have the core retry the step."""
        if self.status != "compiled" or not is_compile_error(error):
            return None
        self._fall_back(trainer, error, where=f"step {trainer.state.step + 1}")
        return StepRetry(micro_batches=1, reason="torch.compile failed; retrying eagerly")

    @hookimpl(tryfirst=True, wrapper=True)
    def validate(self, trainer: Trainer) -> Any:
        """A compile error in validation (eval mode recompiles): go eager and validate again."""
        try:
            return (yield)
        except Exception as e:
            if self.status != "compiled" or not is_compile_error(e):
                raise
            self._fall_back(trainer, e, where="validation")
        return trainer.hook.validate(trainer=trainer)

    # ------------------------------------------------------------------ the end

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["compile"]``: backend, mode and whether the run stayed compiled; restore global flags."""
        section: dict[str, Any] = {"backend": self.options.backend, "mode": self.options.mode, "status": self.status}
        if self.fallback_reason:
            section["fallback_reason"] = self.fallback_reason
        summary["compile"] = section
        self._restore_globals()

    def _restore_globals(self) -> None:
        while self._saved_globals:
            owner, attr, value = self._saved_globals.pop()
            setattr(owner, attr, value)
