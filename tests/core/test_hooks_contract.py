"""The hook contract is written down three times; these tests keep the three in step.

(a) every hookspec in ``kktrain.hookspecs`` has a ``## <name>`` section in docs/hooks.md with its
    exact signature (derived from ``inspect.signature``), its phase, whether it is *firstresult*,
    and since which version;
(b) ``kktrain.phases.Phase`` and the hookspecs correspond one to one, in order;
(c) every hookspec has a test function ``test_hook_<name>`` somewhere under tests/ (found by
    parsing the test files, not by importing them).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from kktrain import hookspecs
from kktrain.phases import Phase

REPO = Path(__file__).resolve().parents[2]
HOOKS_MD = REPO / "docs" / "hooks.md"


def spec_functions() -> list:
    """The hookspecs in definition order."""
    return [f for f in vars(hookspecs).values() if inspect.isfunction(f) and hasattr(f, f"{hookspecs.PROJECT}_spec")]


SPECS = spec_functions()
SPEC_NAMES = [f.__name__ for f in SPECS]


def _annotation(value: object) -> str:
    return value if isinstance(value, str) else inspect.formatannotation(value)


def render_signature(func) -> str:
    """``name(arg: Type, ...) -> Return`` as written in docs/hooks.md."""
    sig = inspect.signature(func)
    params = ", ".join(
        f"{name}: {_annotation(p.annotation)}" if p.annotation is not inspect.Parameter.empty else name
        for name, p in sig.parameters.items()
    )
    ret = "" if sig.return_annotation is inspect.Signature.empty else f" -> {_annotation(sig.return_annotation)}"
    return f"{func.__name__}({params}){ret}"


def doc_sections() -> dict[str, str]:
    """``## name`` sections of docs/hooks.md whose title is a hook-like name (lowercase snake_case)."""
    text = HOOKS_MD.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    sections = {part.split("\n", 1)[0].strip().strip("`"): part for part in parts}
    return {title: body for title, body in sections.items() if re.fullmatch(r"[a-z][a-z0-9_]*", title)}


def test_there_are_hookspecs():
    assert len(SPECS) >= 19, SPEC_NAMES


def test_hookspec_names_are_unique_and_documented_in_the_module_docstring_style():
    assert len(set(SPEC_NAMES)) == len(SPEC_NAMES)
    for func in SPECS:
        doc = inspect.getdoc(func) or ""
        assert "Since " in doc, f"{func.__name__}: its docstring must say since which version"
        assert "Phase ``" in doc, f"{func.__name__}: its docstring must name its phase"


@pytest.mark.parametrize("func", SPECS, ids=SPEC_NAMES)
def test_hooks_md_documents_the_exact_signature(func):
    sections = doc_sections()
    name = func.__name__
    assert name in sections, f"docs/hooks.md has no '## {name}' section"
    section = sections[name]
    signature = render_signature(func)
    assert signature in section, f"docs/hooks.md '## {name}' must contain the exact signature:\n    {signature}"
    phase = next(p for p in Phase if p.hook == name)
    assert f"Phase.{phase.name}" in section, f"docs/hooks.md '## {name}' must name its phase Phase.{phase.name}"
    firstresult = getattr(func, f"{hookspecs.PROJECT}_spec")["firstresult"]
    assert ("*firstresult*" in section) == firstresult, (
        f"docs/hooks.md '## {name}': say *firstresult* exactly when the hookspec is firstresult ({firstresult})"
    )
    since = re.search(r"Since (\d+\.\d+)", inspect.getdoc(func) or "")
    assert since and f"Since {since.group(1)}" in section, f"docs/hooks.md '## {name}' must say 'Since {since.group(1) if since else '?'}'"


def test_hooks_md_has_no_section_for_a_hook_that_does_not_exist():
    extra = set(doc_sections()) - set(SPEC_NAMES)
    assert not extra, f"docs/hooks.md documents hooks that are not hookspecs: {sorted(extra)}"


def test_hooks_md_sections_are_in_hookspec_order():
    documented = [n for n in doc_sections() if n in SPEC_NAMES]
    assert documented == SPEC_NAMES


def test_phases_and_hookspecs_correspond_one_to_one_in_order():
    phases = sorted(Phase, key=lambda p: p.value)
    assert [p.hook for p in phases] == SPEC_NAMES
    assert [p.value for p in phases] == list(range(len(phases))), "Phase values are consecutive from 0"


def test_every_phase_is_described_in_the_phases_docstring():
    import kktrain.phases

    doc = kktrain.phases.__doc__ or ""
    missing = [p.name for p in Phase if not re.search(rf"\b{p.name}\b", doc)]
    assert not missing, f"kktrain/phases.py docstring (the loop in pseudocode) does not mention {missing}"


def _test_function_names(root: Path) -> set[str]:
    names: set[str] = set()
    for path in root.rglob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_hook_"):
                names.add(node.name)
    return names


def test_every_hook_has_its_own_test():
    found = _test_function_names(REPO / "tests") | _test_function_names(REPO / "plugins")
    missing = [n for n in SPEC_NAMES if f"test_hook_{n}" not in found]
    assert not missing, f"hooks without a test_hook_<name> test under tests/ or plugins/*/tests: {missing}"


def test_hot_hooks_are_marked_in_the_contract():
    # The trainer plans the hot path from this one list; it is derived from the @hot markers.
    assert hookspecs.HOT_HOOKS == (
        "forward_loss", "backward", "on_after_backward", "on_before_optimizer_step", "optimizer_step",
        "on_step", "on_step_exception", "on_log",
    )


def test_firstresult_hooks_say_that_none_passes():
    for func in SPECS:
        if getattr(func, f"{hookspecs.PROJECT}_spec")["firstresult"]:
            ret = inspect.signature(func).return_annotation
            assert str(ret).endswith("| None"), f"{func.__name__}: a firstresult hook returns X | None (None passes)"
            assert "eturn ``None``" in (inspect.getdoc(func) or ""), f"{func.__name__}: say what returning None does"
