"""csv: one ``metrics.csv`` per run, every metrics record a row, header = union of keys.

    kktrain run --plugin csv                          # RUN_DIR/metrics.csv
    kktrain run --plugin csv -o csv.kinds='["val"]'   # validation rows only

Columns are ``step``, ``kind``, ``time``, ``epoch`` and then each metric in the order it first
appeared; a record with a new key rewrites the file once with the wider header (earlier rows get
empty cells), as Lightning's CSVLogger does. Rows are written and flushed at the core's log
points. A resume keeps the rows its checkpoint had seen and drops the ones a crashed process
wrote after it (the plugin's state counts them), so the file holds each record once.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from kktrain import PluginOptions, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["CsvPlugin", "read_csv"]

FIRST = ["step", "kind", "time", "epoch"]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, complete rows) of a metrics.csv; a row cut short by a crash is left out."""
    if not path.is_file():
        return [], []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(text.splitlines())
    rows = list(reader)
    return list(reader.fieldnames or []), rows


class CsvPlugin:
    """metrics.csv: every metrics record as a row, header = union of keys, resume-safe."""

    class Options(PluginOptions):
        """``-o csv.KEY=VALUE`` / ``[plugins.csv]``."""

        file: str = "metrics.csv"
        """The file, relative to the run directory (or absolute)."""
        kinds: list[Literal["train", "val", "epoch"]] = ["train", "val", "epoch"]
        """Which records become rows."""

    def __init__(self, options: CsvPlugin.Options | None = None) -> None:
        self.options = options or self.Options()
        self.rows = 0
        self.columns: list[str] = list(FIRST)
        self.path: Path | None = None
        self._file: IO[str] | None = None
        self._writer: Any = None

    def state_dict(self) -> dict[str, Any]:
        """Rows written and the header, so a resume can drop rows written after the checkpoint."""
        return {"rows": self.rows, "columns": list(self.columns)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.rows = int(state["rows"])
        self.columns = [str(c) for c in state["columns"]]

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """Open the file (rank 0); on a resume keep exactly the rows the checkpoint had seen."""
        if not trainer.is_main or trainer.run_dir is None:
            return
        path = Path(self.options.file)
        self.path = path if path.is_absolute() else trainer.run_dir / path
        header, rows = read_csv(self.path)
        if trainer.state.step == 0 or not header:
            rows = []
        self._rewrite(rows[: self.rows])

    @hookimpl
    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Append the record as a row (widening the header when it brings new keys)."""
        if self._file is None or record.get("kind") not in self.options.kinds:
            return
        new = [k for k in record if k not in self.columns]
        if new:
            assert self.path is not None
            self._file.close()
            _, rows = read_csv(self.path)
            self.columns += new
            self._rewrite(rows)
        self._writer.writerow(record)  # str(float) round-trips exactly
        self._file.flush()
        self.rows += 1

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """Close the file; ``summary["csv"] = {"path": ..., "rows": ...}``."""
        if self._file is not None:
            self._file.close()
            self._file = None
            summary["csv"] = {"path": str(self.path), "rows": self.rows}

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """Write header and ``rows`` to a temporary file, replace the file, and keep appending to it."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.rows = len(rows)
        self._file = self.path.open("a", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")

