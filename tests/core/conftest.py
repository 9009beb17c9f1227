"""Fixtures of the core tests (helpers live in kkcli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kkcli import kk


@pytest.fixture
def cli(tmp_path: Path):
    """``cli("run", "--task", "tiny")`` runs the console script in ``tmp_path``."""

    def _cli(*args: str, **kwargs):
        return kk(*args, cwd=tmp_path, **kwargs)

    return _cli
