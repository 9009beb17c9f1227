"""Installing kktrain must not slow down unrelated test suites: its pytest plugin imports nothing heavy."""

import subprocess
import sys


def test_pytest_plugin_and_package_import_without_torch():
    code = (
        "import sys, kktrain, kktrain.testing\n"
        "heavy = sorted(m for m in ('torch', 'pydantic', 'structlog', 'rich') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "from kktrain import Trainer, hookimpl\n"
        "assert 'torch' in sys.modules and Trainer.__name__ == 'Trainer'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_unknown_public_name_is_an_attribute_error():
    import kktrain

    assert "Trainer" in dir(kktrain)
    try:
        kktrain.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("expected AttributeError")
