"""Reading a task's split from `--data-dir`: `DIR/<folder>/<split>.jsonl` (or `.json`, `.parquet`, or
the Hub's `<split>-00000-of-00001.parquet` shards), rows in the Hugging Face dataset's own schema;
failing that, from the Hugging Face `datasets` cache when the dataset was downloaded before."""

from __future__ import annotations

import json
import os
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
    """All rows of one split. `source` is the Hub dataset, "repo" or "repo (config)": where the
    `datasets` cache is searched, and what the error names when the file is missing."""
    where = Path(data_dir) / folder
    path = split_file(where, split)
    if path is None:
        cached = cached_split(source, split)
        if cached:
            return _arrow_rows(cached)
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


def datasets_cache() -> Path:
    """Where `datasets` keeps prepared datasets (its own rule: HF_DATASETS_CACHE, else HF_HOME/datasets)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "datasets"


def cached_split(source: str, split: str) -> list[Path]:
    """The Arrow shards of `split` that `datasets.load_dataset(repo, config)` left in its cache
    (<repo with ___>/<config>/<version>/<hash>/<name>-<split>[-NNNNN-of-NNNNN].arrow), newest
    preparation first found; [] when absent."""
    repo, _, config = source.partition(" (")
    root = datasets_cache() / repo.replace("/", "___") / (config.rstrip(")") or "default")
    files = list(root.glob(f"*/*/*-{split}.arrow")) + list(root.glob(f"*/*/*-{split}-*-of-*.arrow"))
    if not files:
        return []
    newest = max(files, key=lambda p: p.stat().st_mtime).parent
    return sorted(p for p in files if p.parent == newest)


def _pyarrow():
    """pyarrow, needed only for Parquet files and the datasets cache (`pip install mistral7b[eval]`)."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise InputError("reading Parquet or Arrow files needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _arrow_rows(paths: list[Path]) -> list[dict]:
    pa = _pyarrow()
    rows = []
    for path in paths:
        with pa.memory_map(str(path)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def _parquet_rows(paths: list[Path]) -> list[dict]:
    pq = _pyarrow().parquet
    return [row for p in paths for row in pq.read_table(p).to_pylist()]
