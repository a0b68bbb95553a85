"""Reading a task's split from `--data-dir`: `DIR/<folder>/<split>.jsonl` (or `.json`, `.parquet`, or
the Hub's `<split>-00000-of-00001.parquet` shards), rows in the Hugging Face dataset's own schema."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError


def split_file(folder: Path, split: str) -> Path | None:
    """The file holding `split` in `folder`, or None."""
    for name in (f"{split}.jsonl", f"{split}.json", f"{split}.parquet"):
        if (folder / name).is_file():
            return folder / name
    shards = sorted(folder.glob(f"{split}-*.parquet"))
    return shards[0] if shards else None


def load_split(data_dir: str | Path, folder: str, split: str, source: str) -> list[dict]:
    """All rows of one split; `source` (the Hub dataset) goes into the error when the file is missing."""
    where = Path(data_dir) / folder
    path = split_file(where, split)
    if path is None:
        raise InputError(f"missing {where / (split + '.jsonl')} (or .parquet): download the '{split}' split of "
                         f"the Hugging Face dataset {source} and save it there")
    if path.suffix == ".parquet":
        shards = sorted(where.glob(f"{split}-*.parquet")) if path.name.startswith(f"{split}-") else [path]
        return _parquet_rows(shards)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {number} is not JSON ({e.msg})") from None
    return rows


def _parquet_rows(paths: list[Path]) -> list[dict]:
    import pyarrow.parquet as pq  # only when a Parquet file is read

    return [row for p in paths for row in pq.read_table(p).to_pylist()]


def present_subsets(data_dir: str | Path, folder: str, subsets: tuple[str, ...], split: str) -> list[str]:
    """The subsets (sub-folders, e.g. MMLU subjects or BBH tasks) whose `split` file is there."""
    return [s for s in subsets if split_file(Path(data_dir) / folder / s, split) is not None]
