"""``kktrain export``: a trained model out of a run, as ONNX, TorchScript or a plain state dict.

The model is rebuilt from the run (:func:`kktrain.load_model`) and traced on
``Task.example_input()``. ONNX goes through torch's exporter with a dynamic batch axis and is
checked with onnxruntime when it is installed: the outputs must match the torch model on the
example input and on another batch size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kktrain.errors import ConfigError

FORMATS = ("onnx", "torchscript", "state_dict")
EXPORT_EXTRA = "pip install 'kktrain[export]'  (onnx, onnxscript, onnxruntime)"


@dataclass
class ExportResult:
    """Where the export went and how it was checked."""

    path: Path
    format: str
    checked: list[str] = field(default_factory=list)
    """One line per check, e.g. ``onnxruntime batch 2: max |diff| 1.2e-06``."""


def _as_args(example: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, (list, tuple)) and example and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(example)
    raise ConfigError(
        f"example_input() returned {type(example).__name__}: return the model's input as a tensor or a tuple of "
        "tensors (the arguments of model.forward)"
    )


def _other_batch(args: tuple[torch.Tensor, ...], size: int) -> tuple[torch.Tensor, ...]:
    """The example inputs repeated (or cut) to ``size`` rows along the batch axis."""
    out = []
    for a in args:
        reps = -(-size // a.shape[0])
        out.append(a.repeat(reps, *([1] * (a.dim() - 1)))[:size].contiguous())
    return tuple(out)


def _outputs(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result.detach()]
    if isinstance(result, (list, tuple)):
        return [t.detach() for t in result if isinstance(t, torch.Tensor)]
    if isinstance(result, dict):
        return [t.detach() for t in result.values() if isinstance(t, torch.Tensor)]
    return []


def export_model(
    run: str | os.PathLike[str], *, format: str, out: str | os.PathLike[str], weights: str = "auto", task: Any = None,
) -> ExportResult:
    """Export the model of ``run`` (a run directory or checkpoint) to ``out``."""
    from kktrain.api import checkpoint_of, load_task_and_model

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    target = Path(out)
    if target.is_dir():
        raise ConfigError(f"--out {target} is a directory: give a file name, like model.{'pt' if format != 'onnx' else 'onnx'}")
    if not target.parent.exists():
        raise ConfigError(f"--out {target}: the directory {target.parent} does not exist")
    if format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"ONNX export needs the export extra ({e.name} is not installed): {EXPORT_EXTRA}") from None
    bound, model = load_task_and_model(run, weights=weights, task=task)
    source = checkpoint_of(run)
    if format == "state_dict":
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, target)
        return ExportResult(target, format, [f"weights of {source.name} ({weights})"])
    example = bound.example_input()
    if example is None:
        raise ConfigError(
            f"task '{bound.name}' has no example_input(): add a method returning one model input (a tensor or a "
            "tuple of tensors, a small batch) so the model can be traced"
        )
    args = _as_args(example)
    if args[0].shape[0] == 1:  # a batch axis of size 1 would be specialised away by the tracer
        args = _other_batch(args, 2)
    with torch.no_grad():
        expected = {args[0].shape[0]: _outputs(model(*args))}
        other = _other_batch(args, args[0].shape[0] + 3)
        expected[other[0].shape[0]] = _outputs(model(*other))
    result = ExportResult(target, format)
    if format == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, args)
        traced.save(str(target))
        loaded = torch.jit.load(str(target))
        for inputs in (args, other):
            got = _outputs(loaded(*inputs))
            result.checked.append(_compare("torchscript", inputs[0].shape[0], expected[inputs[0].shape[0]], got))
        return result
    _export_onnx(model, args, target)
    try:
        import onnxruntime
    except ImportError:
        result.checked.append(f"not run in onnxruntime ({EXPORT_EXTRA})")
        return result
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for inputs in (args, other):
        feeds = {n: t.numpy() for n, t in zip(names, inputs)}
        got = [torch.from_numpy(o) for o in session.run(None, feeds)]
        result.checked.append(_compare("onnxruntime", inputs[0].shape[0], expected[inputs[0].shape[0]], got))
    return result


def _export_onnx(model: torch.nn.Module, args: tuple[torch.Tensor, ...], target: Path) -> None:
    """torch's ONNX exporter (dynamo), the first axis of every input dynamic."""
    import logging
    import warnings

    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in args)
    names = [f"input{i}" for i in range(len(args))] if len(args) > 1 else ["input"]
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..." and progress lines
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's chatter; errors still raise
        try:
            program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic, input_names=names,
                                        output_names=["output"], verbose=False)
        except Exception as e:  # noqa: BLE001 - the exporter's many error types
            raise ConfigError(f"torch.onnx.export failed ({type(e).__name__}: {' '.join(str(e).split())[:240]}): "
                              "try --format torchscript or state_dict") from None
        finally:
            quiet.setLevel(level)
    assert program is not None
    program.save(str(target))


def _compare(where: str, batch: int, expected: list[torch.Tensor], got: list[torch.Tensor]) -> str:
    if len(expected) != len(got):
        raise ConfigError(f"{where}: the exported model returns {len(got)} outputs, the torch model {len(expected)}")
    worst = 0.0
    for e, g in zip(expected, got):
        if tuple(e.shape) != tuple(g.shape):
            raise ConfigError(f"{where} at batch {batch}: output shape {tuple(g.shape)}, the torch model gives {tuple(e.shape)}")
        finite = torch.isfinite(e)
        if not torch.equal(finite, torch.isfinite(g.to(e.dtype))):
            raise ConfigError(f"{where} at batch {batch}: the exported model's non-finite outputs differ from torch's")
        if finite.any():
            worst = max(worst, float((e[finite].double() - g.to(e.dtype)[finite].double()).abs().max()))
    if not worst <= 1e-3 + 1e-3 * max(float(e[torch.isfinite(e)].abs().max()) if torch.isfinite(e).any() else 0.0 for e in expected):
        raise ConfigError(f"{where} at batch {batch}: outputs differ from the torch model's by up to {worst:.3g}")
    return f"{where} batch {batch}: max |diff| {worst:.2g}"
