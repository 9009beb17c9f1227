"""kktrain's pytest plugin: fixtures for testing kktrain plugins (entry point ``pytest11``).

Imports torch and kktrain only when a fixture is used, so installing kktrain does not slow
down unrelated test suites.

Fixtures:

``kktrain_run``
    ``kktrain_run(plugins=["ema"], options={"ema.decay": 0.9}, steps=20)`` trains the tiny task
    in-process into a fresh directory and returns a :class:`RunOutcome`.
``hook_recorder``
    A :class:`HookRecorder`; pass it as ``kktrain_run(..., recorder=hook_recorder)``.
``fault_injector``
    The :class:`FaultInjector` class: ``fault_injector(nan_at=[5], spike_at={8: 20.0},
    oom_at=[3], oom_above=8)``; pass the instance in ``plugins``.
``assert_resume_equivalent``
    ``assert_resume_equivalent(plugins=["ema"], steps=12, cut=5)``: N steps in one go equal
    k steps, resume, N-k steps, bit for bit (model, optimizer, plugin state).
``tiny_task``
    A fresh tiny task (an MLP on synthetic points).
``kktrain_cli``
    ``kktrain_cli("run", "--task", "tiny", "--plugin", "ema", check=True)`` runs the real command
    line (``python -m kktrain``) in a subprocess in the test's ``tmp_path`` (one torch thread);
    returns the ``subprocess.CompletedProcess`` (text).
``plugin_contract``
    ``plugin_contract("grad-noise")`` runs the plugin contract on an installed plugin: options
    reject unknown keys, only kktrain's public API is imported, state survives a checkpoint round
    trip bit for bit, resume is exact.
    kktrain runs it over every installed plugin (tests/contract); a third-party distribution
    calls it from its own tests. See docs/testing-plugins.md.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_counter = itertools.count()


@dataclass
class HookCall:
    """One recorded hook call."""

    name: str
    kwargs: dict[str, Any]
    plugins: list[str]


@dataclass
class HookRecorder:
    """Records hook calls via pluggy's hook-call monitoring."""

    calls: list[HookCall] = field(default_factory=list)
    ignore: frozenset[str] = frozenset()
    #: Also register a pass-through plugin that implements every hook (returning ``None``), so
    #: that hooks nobody implements fire too (the core skips those on the hot path otherwise).
    fire_all: bool = False

    def attach(self, pm: Any) -> None:
        """Start recording the calls of plugin manager ``pm``."""
        if self.fire_all:
            pm.register(_PassThrough(), name="hook-recorder")

        def before(hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
            if hook_name not in self.ignore:
                self.calls.append(HookCall(hook_name, dict(kwargs), [i.plugin_name for i in impls]))

        def after(outcome: Any, hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
            return None

        pm.add_hookcall_monitoring(before, after)

    @property
    def names(self) -> list[str]:
        """The hook names in call order."""
        return [c.name for c in self.calls]

    def of(self, name: str) -> list[HookCall]:
        """The calls of one hook."""
        return [c for c in self.calls if c.name == name]

    def compressed(self) -> list[tuple[str, int]]:
        """``names`` with consecutive repeats folded: ``[("on_step", 3), ...]``."""
        return [(name, len(list(group))) for name, group in itertools.groupby(self.names)]


class _PassThrough:
    """Implements every hook and returns ``None``: each hook fires, nothing changes."""

    def __init__(self) -> None:
        from kktrain import hookspecs

        for spec_name in spec_names(hookspecs):
            setattr(self, spec_name, hookspecs.hookimpl(specname=spec_name)(_make_pass()))


def _make_pass() -> Callable[..., None]:
    def _pass() -> None:
        return None

    return _pass


def spec_names(module: Any) -> list[str]:
    """The hookspecs of ``module`` in definition order."""
    return [n for n, f in vars(module).items() if callable(f) and hasattr(f, "kktrain_spec")]


@dataclass
class RunOutcome:
    """What a test run left behind."""

    summary: dict[str, Any]
    run_dir: Path
    trainer: Any
    error: BaseException | None = None

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def checkpoints(self) -> list[Path]:
        """Checkpoint files, newest step first."""
        from kktrain.checkpoint import list_checkpoints

        return list_checkpoints(self.run_dir / "checkpoints")

    def final_payload(self) -> dict[str, Any]:
        """The loaded ``final.pt`` (or the newest checkpoint when the run did not finish)."""
        from kktrain.checkpoint import load_checkpoint

        final = self.run_dir / "checkpoints" / "final.pt"
        return load_checkpoint(final if final.exists() else self.checkpoints[0])

    def assert_success(self) -> None:
        """The run completed, with a summary and finite final validation metrics."""
        import math

        assert self.error is None, f"run failed: {self.error!r}"
        assert self.summary.get("status") == "completed", f"status {self.summary.get('status')}: {self.summary.get('stop_reason')}"
        assert (self.run_dir / "summary.json").exists()
        bad = {k: v for k, v in self.summary.get("final", {}).items() if not math.isfinite(v)}
        assert not bad, f"non-finite final metrics: {bad}"


class FaultInjector:
    """A real plugin that injects faults at chosen steps: NaN loss, a loss spike, out-of-memory,
    an unhandled error (``raise_at``: a ``RuntimeError`` in the step's forward, once per step).

    Steps are the 1-based number of the optimizer step being computed (``state.step + 1``).
    ``oom_above``: the OOM is raised only while the micro-batch is larger than this, so a
    retry with smaller micro-batches succeeds, like a real OOM.

    A NaN, inf or spike fires once per listed step: a guard that skips the step or rolls back
    computes the same step number again, on another batch, and that one is clean (as a real
    transient fault would be). ``repeat=True`` fires it every time the step is computed.
    """

    name = "fault-inject"

    def __init__(
        self,
        nan_at: Iterable[int] = (),
        spike_at: Mapping[int, float] | None = None,
        oom_at: Iterable[int] = (),
        oom_above: int = 0,
        inf_at: Iterable[int] = (),
        repeat: bool = False,
        raise_at: Iterable[int] = (),
    ) -> None:
        self.nan_at = set(nan_at)
        self.inf_at = set(inf_at)
        self.spike_at = dict(spike_at or {})
        self.oom_at = set(oom_at)
        self.oom_above = oom_above
        self.raise_at = set(raise_at)
        self.repeat = repeat
        self.injected: list[tuple[str, int]] = []
        from kktrain.hookspecs import hookimpl

        def due(kind: str, steps: Iterable[int], step: int) -> bool:
            return step in steps and (self.repeat or (kind, step) not in self.injected)

        def forward_loss(trainer: Any, batch: Any) -> Any:
            from kktrain import batch_size_of

            step = trainer.state.step + 1
            if due("error", self.raise_at, step):
                self.injected.append(("error", step))
                raise RuntimeError(f"error injected by fault-inject at step {step}")
            if step in self.oom_at and batch_size_of(batch) > self.oom_above:
                import torch

                self.injected.append(("oom", step))
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected by fault-inject at step {step})")
            loss = yield
            if due("nan", self.nan_at, step):
                self.injected.append(("nan", step))
                return loss * float("nan")
            if due("inf", self.inf_at, step):
                self.injected.append(("inf", step))
                return loss * float("inf")
            if due("spike", self.spike_at, step):
                self.injected.append(("spike", step))
                return loss * self.spike_at[step]
            return loss

        self.forward_loss = hookimpl(wrapper=True, tryfirst=True)(forward_loss)


def run_tiny(
    tmp_dir: Path,
    *,
    plugins: Sequence[str | object] = (),
    options: Mapping[str, Any] | None = None,
    steps: int = 20,
    task: str = "tiny",
    task_options: Mapping[str, Any] | None = None,
    resume: str | None = None,
    stop_at_step: int | None = None,
    recorder: HookRecorder | None = None,
    out: Path | None = None,
    raise_errors: bool = True,
    **core: Any,
) -> RunOutcome:
    """Train in-process; ``options`` take the same dotted keys as ``-o`` (``ema.decay``).

    The config goes through :func:`kktrain.config.assemble`, exactly as on the command line.
    """
    from kktrain.config import assemble
    from kktrain.trainer import Trainer

    out = out or tmp_dir / f"run{next(_counter)}"
    names = [p for p in plugins if isinstance(p, str)]
    objects = [p for p in plugins if not isinstance(p, str)]
    task_keys = {f"task.{k}": v for k, v in (task_options or {}).items()}
    assembly = assemble(
        task=task, plugins=names, options={**core, **(options or {}), **task_keys},
        flags={"max_steps": steps, "out": str(out)}, resume=resume, environ={}, instances=objects,
    )
    assembly.config.stop_at_step = stop_at_step
    trainer = Trainer.from_assembly(assembly, plugins=objects, resume=resume, quiet=True)
    if recorder is not None:
        recorder.attach(trainer.pm)
    try:
        summary = trainer.fit()
    except BaseException as e:
        trainer.close()
        if raise_errors:
            raise
        return RunOutcome({}, out, trainer, e)
    return RunOutcome(summary, out, trainer)


def _tensors_equal(a: Any, b: Any, path: str = "") -> list[str]:
    import torch

    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            return [path]
        return []
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) != set(b):
            return [f"{path} (keys differ)"]
        return [d for k in a for d in _tensors_equal(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [f"{path} (length differs)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _tensors_equal(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and a != a and isinstance(b, float) and b != b:
        return []
    return [] if a == b else [f"{path} ({a!r} != {b!r})"]


def compare_payloads(a: Mapping[str, Any], b: Mapping[str, Any], parts: Sequence[str] = ("model", "optimizer", "scheduler", "plugins")) -> list[str]:
    """Paths at which two checkpoints differ (tensors compared bit for bit)."""
    diffs: list[str] = []
    for part in parts:
        diffs += _tensors_equal(a.get(part), b.get(part), part)
    for key in ("step", "epoch", "batch_in_epoch", "skipped_steps", "knobs", "skip_batches"):
        diffs += _tensors_equal(a["state"].get(key), b["state"].get(key), f"state.{key}")
    return diffs


def resume_equivalent(
    tmp_dir: Path, *, plugins: Sequence[str | object] | Callable[[], Sequence[object]] = (), steps: int = 12, cut: int = 5, **kwargs: Any
) -> tuple[RunOutcome, RunOutcome]:
    """Run ``steps`` in one go and ``cut`` + resume; assert bit-identical final state."""
    make = plugins if callable(plugins) else (lambda: plugins)
    whole = run_tiny(tmp_dir, plugins=make(), steps=steps, **kwargs)
    out = tmp_dir / f"cut{next(_counter)}"
    run_tiny(tmp_dir, plugins=make(), steps=steps, stop_at_step=cut, out=out, **kwargs)
    resumed = run_tiny(tmp_dir, plugins=make(), steps=steps, resume="auto", out=out, **kwargs)
    diffs = compare_payloads(whole.final_payload(), resumed.final_payload())
    assert not diffs, f"resumed run differs from the uninterrupted one at: {diffs[:10]}"
    return whole, resumed


# ---------------------------------------------------------------------------------------------
# The plugin contract: what every installed plugin must satisfy (tests/contract runs it over all
# of them; a third-party distribution runs it on its own plugin through ``plugin_contract``).
# ---------------------------------------------------------------------------------------------

#: The run every contract check trains: the tiny task, 96 samples in batches of 16 (6 steps per
#: epoch), 10 steps, so an epoch boundary, a validation and a mid-epoch resume all happen. The
#: core keys are set as if by the user, so ``on_hw_detect`` plugins leave them alone.
CONTRACT_STEPS = 10
CONTRACT_CUT = 7
CONTRACT_TASK_OPTIONS: dict[str, Any] = {"samples": 96, "dropout": 0.1}
CONTRACT_CORE: dict[str, Any] = {"batch_size": 16, "log_every": 2, "val_every": 4, "data.workers": 0}

_STATE_TYPES = (bool, int, float, str, type(None))


def contract_fail(message: str) -> None:
    """Fail the current test with ``message`` only (no traceback into kktrain.testing)."""
    pytest.fail(message, pytrace=False)


def load_installed_plugin(name: str) -> Any:
    """The class behind installed plugin ``name``; a clear test failure when it cannot be loaded."""
    from kktrain.manager import _dist_of, installed_entry_points

    eps = installed_entry_points()
    if name not in eps:
        contract_fail(f"plugin '{name}' is not installed: installed plugins are {', '.join(sorted(eps)) or '(none)'}")
    ep = eps[name]
    dist, version = _dist_of(ep)
    try:
        return ep.load()
    except Exception as e:  # noqa: BLE001 - any import-time failure is the plugin's
        error = f"{type(e).__name__}: {e}"
    contract_fail(
        f"plugin '{name}' failed to load ({error}): entry point '{name} = {ep.value}' of distribution {dist} {version}"
    )


def contract_run_options(name: str, cls: Any) -> dict[str, Any]:
    """Run keyword arguments for a contract run of ``name``: the plugin's ``contract_options``
    (its own option keys) and ``contract_config`` (core keys) over :data:`CONTRACT_CORE`."""
    own = dict(getattr(cls, "contract_options", None) or {})
    core = dict(getattr(cls, "contract_config", None) or {})
    return {**CONTRACT_CORE, **core, "options": {f"{name}.{k}": v for k, v in own.items()}}


def new_contract_instance(name: str, cls: Any) -> Any:
    """A fresh instance with the defaults plus ``contract_options``; a clear failure if it cannot be made."""
    from kktrain.errors import KKTrainError
    from kktrain.manager import resolve_plugins

    own = dict(getattr(cls, "contract_options", None) or {})
    problem = None
    try:
        return resolve_plugins([name], {name: own} if own else {})[0][name]
    except KKTrainError as e:
        problem = str(e)
    hint = "fix contract_options" if own else "give every option a default, or declare working ones as `contract_options = {...}` (docs/writing-plugins.md)"
    contract_fail(f"plugin '{name}' cannot be created with {'its contract_options' if own else 'its default options'}: {problem}; {hint}")


def check_plugin_options(name: str) -> None:
    """Options exist (or ``Options = None`` says there are none), are strict, reject unknown keys
    with an error naming the plugin; the defaults (plus ``contract_options``) instantiate."""
    from kktrain.errors import KKTrainError
    from kktrain.manager import build_plugin_manager, first_line, implemented_hooks, resolve_plugins

    cls = load_installed_plugin(name)
    if not first_line(getattr(cls, "__doc__", None)):
        contract_fail(f"plugin '{name}': {cls.__qualname__} has no docstring; its first line is what `kktrain plugins` shows")
    if "Options" not in dir(cls):
        contract_fail(
            f"plugin '{name}': {cls.__qualname__} has no Options: give it a model "
            "`class Options(kktrain.PluginOptions)`, or set `Options = None` to declare it takes none"
        )
    model = cls.Options
    if model is not None:
        from pydantic import BaseModel

        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            contract_fail(f"plugin '{name}': Options must be a pydantic BaseModel subclass, got {model!r}")
        config = model.model_config
        if config.get("extra") != "forbid":
            contract_fail(f"plugin '{name}': Options.model_config needs extra='forbid' (unknown keys must be errors)")
        if not config.get("validate_assignment"):
            contract_fail(
                f"plugin '{name}': Options.model_config needs validate_assignment=True "
                "(on_hw_detect updates options by assignment; a bad value must be an error)"
            )
    own = dict(getattr(cls, "contract_options", None) or {})
    instances = {name: new_contract_instance(name, cls)}
    bogus = "no_such_option_for_contract"
    message = None
    try:
        resolve_plugins([name], {name: {**own, bogus: 1}})
    except KKTrainError as e:
        message = str(e)
    if message is None:
        contract_fail(f"plugin '{name}' accepted an unknown option '{bogus}': unknown keys must be a ConfigError")
    elif f"'{name}'" not in message or "\n" in message:
        contract_fail(f"plugin '{name}': the error for an unknown option must be one line naming the plugin, got: {message!r}")
    hooks = implemented_hooks(instances[name])
    if not hooks:
        contract_fail(f"plugin '{name}' implements no hook: mark its methods with @kktrain.hookimpl")
    from kktrain.manager import COMMANDS_GROUP, installed_entry_points

    if "register_commands" in hooks and name not in installed_entry_points(COMMANDS_GROUP):
        contract_fail(
            f"plugin '{name}' implements register_commands but its distribution does not list it in the entry-point "
            f"group {COMMANDS_GROUP!r}: add [project.entry-points.\"{COMMANDS_GROUP}\"] {name} = \"...\" (docs/hooks.md)"
        )
    from kktrain.defaults import CoreDefaults

    problem = None
    try:
        build_plugin_manager(instances, CoreDefaults())
    except KKTrainError as e:
        problem = str(e)
    if problem is not None:
        contract_fail(problem)


def plugin_import_violations(name: str) -> list[str]:
    """Imports in the plugin's package that break the rule "only kktrain's public API, no other
    plugin": ``kktrain.<submodule>``, names outside ``kktrain.__all__``, other ``kktrain_*`` packages."""
    import ast
    import importlib
    import sys

    import kktrain

    cls = load_installed_plugin(name)
    top = cls.__module__.split(".")[0]
    module = sys.modules.get(top) or importlib.import_module(top)
    origin = Path(getattr(module, "__file__", "") or "")
    files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
    public = set(kktrain.__all__)
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
                if node.module == "kktrain":
                    found += [f"{where}: from kktrain import {a.name} (not in kktrain.__all__)" for a in node.names if a.name not in public]
            else:
                continue
            for mod in mods:
                head = mod.split(".")[0]
                if head == "kktrain" and mod != "kktrain":
                    found.append(f"{where}: {mod} (a kktrain internal; use `from kktrain import ...`)")
                elif head.startswith("kktrain_") and head != top:
                    found.append(f"{where}: {mod} (another plugin)")
    return found


def check_plugin_imports(name: str) -> None:
    """The plugin imports only kktrain's public API and no other plugin."""
    bad = plugin_import_violations(name)
    if bad:
        contract_fail(f"plugin '{name}' imports beyond kktrain's public API: {'; '.join(bad[:6])}")


def _check_state_types(name: str, value: Any, path: str) -> None:
    import torch

    if isinstance(value, torch.Tensor) or isinstance(value, _STATE_TYPES):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                contract_fail(f"plugin '{name}': state_dict(){path} has a key {k!r} of type {type(k).__name__}: use str or int keys")
            _check_state_types(name, v, f"{path}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_state_types(name, v, f"{path}[{i}]")
        return
    contract_fail(
        f"plugin '{name}': state_dict(){path} is a {type(value).__module__}.{type(value).__qualname__}; "
        "checkpoints hold only tensors, numbers, strings, bools, None and lists/tuples/dicts of those"
    )


def check_plugin_state(tmp_dir: Path, name: str) -> RunOutcome:
    """Train a contract run with the plugin; its state is in the checkpoint under its name and a
    fresh instance's ``load_state_dict`` then ``state_dict`` gives it back bit for bit."""
    cls = load_installed_plugin(name)
    has_save, has_load = hasattr(cls, "state_dict"), hasattr(cls, "load_state_dict")
    if has_save != has_load:
        contract_fail(f"plugin '{name}' has {'state_dict' if has_save else 'load_state_dict'} without the other: implement both or neither")
    new_contract_instance(name, cls)
    kwargs = contract_run_options(name, cls)
    outcome = run_tiny(tmp_dir, plugins=[name], steps=CONTRACT_STEPS, task_options=CONTRACT_TASK_OPTIONS, **kwargs)
    if outcome.summary.get("status") not in ("completed", "stopped"):
        contract_fail(f"plugin '{name}': the contract run ended with status {outcome.summary.get('status')!r} ({outcome.summary.get('stop_reason')})")
    payload = outcome.final_payload()
    saved = payload.get("plugins", {})
    if not has_save:
        if name in saved:
            contract_fail(f"plugin '{name}' has no state_dict but the checkpoint holds state under its name")
        return outcome
    if name not in saved:
        contract_fail(f"plugin '{name}' has state_dict but the final checkpoint has no payload['plugins']['{name}']")
    state = saved[name]
    _check_state_types(name, state, "")
    fresh = new_contract_instance(name, cls)
    problem = None
    try:
        fresh.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        contract_fail(
            f"plugin '{name}': load_state_dict() on a fresh instance failed ({problem}); it must accept "
            "its own state before any hook has run (keep it and apply it when the model is there)"
        )
    diffs = _tensors_equal(state, fresh.state_dict(), f"plugins[{name!r}]")
    if diffs:
        contract_fail(f"plugin '{name}': state_dict() after load_state_dict() on a fresh instance differs at {diffs[:5]}")
    return outcome


def check_plugin_resume(tmp_dir: Path, name: str) -> tuple[RunOutcome, RunOutcome]:
    """A contract run cut at :data:`CONTRACT_CUT` and resumed equals the uninterrupted one bit for bit."""
    cls = load_installed_plugin(name)
    new_contract_instance(name, cls)
    kwargs = contract_run_options(name, cls)
    try:
        return resume_equivalent(
            tmp_dir, plugins=[name], steps=CONTRACT_STEPS, cut=CONTRACT_CUT, task_options=CONTRACT_TASK_OPTIONS, **kwargs
        )
    except AssertionError as e:
        problem = str(e)
    contract_fail(f"plugin '{name}': {problem}")
    raise AssertionError(problem)  # unreachable: contract_fail raises


def plugin_readme(name: str) -> tuple[str, str]:
    """(distribution name, its long description: the README that pip shows) of plugin ``name``."""
    from importlib.metadata import distribution

    from kktrain.manager import _dist_of, installed_entry_points

    dist, _ = _dist_of(installed_entry_points()[name])
    meta: Any = distribution(dist).metadata  # an email.message.Message underneath
    text = meta.get_payload() if hasattr(meta, "get_payload") else ""
    return dist, str(text or meta.get("Description") or "")


def check_plugin_docs(name: str) -> None:
    """The plugin's distribution ships a README (its documentation page) with a title and every
    option in its options table: the same rule for builtin and third-party plugins."""
    cls = load_installed_plugin(name)
    dist, text = plugin_readme(name)
    if len(text.strip()) < 80:
        contract_fail(f"plugin '{name}' (distribution {dist}) ships no README: write README.md and set readme = \"README.md\" in its pyproject.toml")
    if not text.lstrip().startswith("#"):
        contract_fail(f"plugin '{name}': its README must start with a '# ' title")
    model = getattr(cls, "Options", None)
    fields = list(getattr(model, "model_fields", {})) if model is not None else []
    missing = [f for f in fields if f"`{f}`" not in text and f"| {f} " not in text]
    if missing:
        contract_fail(f"plugin '{name}': options {missing} are not in its README's options table")


def check_plugin_contract(tmp_dir: Path, name: str) -> None:
    """All contract checks for installed plugin ``name``."""
    check_plugin_options(name)
    check_plugin_imports(name)
    check_plugin_docs(name)
    check_plugin_state(tmp_dir, name)
    check_plugin_resume(tmp_dir, name)


def pytest_addoption(parser: pytest.Parser) -> None:
    """``kktrain_torch_threads`` (ini): the torch thread count for every test."""
    parser.addini(
        "kktrain_torch_threads",
        "torch.set_num_threads for every test (e.g. 1 under pytest-xdist on a small machine); unset: leave torch alone",
        default="",
    )


@pytest.fixture(autouse=True)
def _kktrain_torch_threads(request: pytest.FixtureRequest) -> Any:
    """Apply ``kktrain_torch_threads`` around each test (torch is imported only when it is set)."""
    value = str(request.config.getini("kktrain_torch_threads")).strip()
    if not value:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(value))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kktrain_run(tmp_path: Path) -> Callable[..., RunOutcome]:
    """Run a tiny training in-process: ``kktrain_run(plugins=[...], options={...}, steps=N)``."""

    def _run(**kwargs: Any) -> RunOutcome:
        return run_tiny(tmp_path, **kwargs)

    return _run


def run_cli(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 300, check: bool = False
) -> Any:
    """``kktrain ARGS`` in a subprocess in ``cwd`` (the interpreter running the tests)."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k != "KKTRAIN_TRACE_HOOKS"}
    full_env = {**base, "OMP_NUM_THREADS": "1", "KKTRAIN_RUNS_DIR": str(cwd / "runs"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "kktrain", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kktrain {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def kktrain_cli(tmp_path: Path) -> Callable[..., Any]:
    """Run the real ``kktrain`` command line in ``tmp_path``: ``kktrain_cli("plugins", "--json")``."""

    def _cli(*args: str, **kwargs: Any) -> Any:
        return run_cli(*args, cwd=tmp_path, **kwargs)

    return _cli


@pytest.fixture
def hook_recorder() -> HookRecorder:
    """Records hook calls; pass to ``kktrain_run(recorder=...)``."""
    return HookRecorder()


@pytest.fixture
def fault_injector() -> type[FaultInjector]:
    """The fault-injection plugin class (NaN, spike, OOM at chosen steps)."""
    return FaultInjector


@pytest.fixture
def assert_resume_equivalent(tmp_path: Path) -> Callable[..., tuple[RunOutcome, RunOutcome]]:
    """``assert_resume_equivalent(plugins=[...], steps=12, cut=5, options={...})``."""

    def _check(**kwargs: Any) -> tuple[RunOutcome, RunOutcome]:
        return resume_equivalent(tmp_path, **kwargs)

    return _check


@pytest.fixture
def tiny_task() -> Any:
    """A fresh tiny task."""
    from kktrain.tasks.tiny import make_task

    return make_task()


@pytest.fixture
def plugin_contract(tmp_path: Path) -> Callable[[str], None]:
    """``plugin_contract("my-plugin")``: the contract checks kktrain runs over every plugin."""

    def _check(name: str) -> None:
        check_plugin_contract(tmp_path, name)

    return _check
