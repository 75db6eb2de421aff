"""Reading data records with their locations: JSONL, Parquet and HF `datasets`.

Every record keeps where it came from (file and 1-based line for JSONL, row
for Parquet and HF data sets), so that `rlhf_jax.data.datasets` can report
a bad row as `file, line N: what is wrong`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from rlhf_jax.errors import DataError

__all__ = ["DataError", "Row", "read_rows", "read_sources"]


@dataclasses.dataclass(frozen=True)
class Row:
    """One record and where it came from."""

    source: str
    number: int  # 1-based line (JSONL) or row (Parquet / HF)
    unit: str  # "line" or "row"
    data: Any

    @property
    def where(self) -> str:
        """`file, line N` for error messages."""
        return f"{self.source}, {self.unit} {self.number}"

    def error(self, message: str) -> DataError:
        """A DataError located at this row."""
        return DataError(f"{self.where}: {message}")


def _is_local_file(source: str) -> bool:
    return os.path.exists(source) or source.endswith((".jsonl", ".json", ".parquet", ".pq"))


def _read_jsonl(path: str) -> list[Row]:
    rows = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror})") from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: invalid JSON ({e.msg} at column {e.colno})") from None
            rows.append(Row(path, number, "line", record))
    return rows


def _read_parquet(path: str) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with the test extras
        raise DataError(f"{path}: reading Parquet needs `pyarrow` (pip install pyarrow)") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet ({e})") from None
    return [Row(path, i + 1, "row", r) for i, r in enumerate(records)]


def _read_hub(name: str) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name!r} is not a local file, and HF `datasets` is not installed to load it "
                        "from the hub (pip install 'rlhf_jax[hub]')") from None
    parts = name.split(":")
    if len(parts) > 3:
        raise DataError(f"{name!r}: write an HF data set as `name`, `name:split` or `name:config:split`")
    dataset_name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) > 1 else "train"
    try:
        ds = datasets.load_dataset(dataset_name, config, split=split)
    except Exception as e:  # offline, unknown name, ...
        raise DataError(f"{name!r} is not a local file and could not be loaded from the HF hub "
                        f"({type(e).__name__}: {e})") from None
    return [Row(f"{dataset_name}:{split}", i + 1, "row", r) for i, r in enumerate(ds)]


def read_rows(source: str, *, max_rows: int | None = None) -> list[Row]:
    """Read the records of one source.

    Args:
      source: a `.parquet` file, a JSONL file (any other local path), or an HF
        data set `name`, `name:split` or `name:config:split` (needs `datasets`
        and network; the split defaults to "train").
      max_rows: keep only the first N records.

    Returns:
      The records with their locations.

    Raises:
      DataError: missing file, invalid JSON (with the line), unreadable Parquet.
    """
    source = os.fspath(source)
    if _is_local_file(source):
        if not os.path.isfile(source):
            raise DataError(f"{source}: no such data file")
        rows = _read_parquet(source) if source.endswith((".parquet", ".pq")) else _read_jsonl(source)
    else:
        rows = _read_hub(source)
    if not rows:
        raise DataError(f"{source}: the data set is empty")
    return rows[:max_rows] if max_rows else rows


def read_sources(sources: Sequence[str], *, max_rows: int | None = None) -> list[Row]:
    """`read_rows` over several sources, concatenated in order."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise DataError("no data files given")
    rows = []
    for source in sources:
        rows.extend(read_rows(source, max_rows=max_rows))
    return rows
