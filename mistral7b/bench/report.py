"""What the measurements mean: bytes per decoded token, GB/s against the measured bandwidth, ratios to
the peers; and the two tables (markdown, aligned) the command prints."""

from __future__ import annotations

METRICS = ("prefill_tok_s", "decode_b1_tok_s", "decode_bn_tok_s")


def add_bandwidth(row: dict, bandwidth_gb_s: float | None, mean_context: float) -> None:
    """Bytes a batch-1 decode step reads (the weights it touches plus the keys and values of the
    `mean_context` positions it attends to, on average) x decode tok/s = achieved GB/s."""
    if row.get("decode_b1_tok_s") is None:
        return
    per_token = row["weight_bytes_per_token"] + row["kv_bytes_per_position"] * mean_context
    row["bytes_per_token"] = round(per_token)
    row["gb_s"] = per_token * row["decode_b1_tok_s"] / 1e9
    if bandwidth_gb_s:
        row["bandwidth_pct"] = 100 * row["gb_s"] / bandwidth_gb_s
        row["bandwidth_limit_tok_s"] = bandwidth_gb_s * 1e9 / per_token


def add_ratios(rows: list[dict]) -> None:
    """rows[i]["vs"][peer] = ours / peer for each metric, against the transformers row of the same
    dtype and the llama.cpp row (the file's own weights)."""
    measured = [r for r in rows if "skipped" not in r]
    for row in (r for r in measured if r["engine"] == "ours"):
        peers = [r for r in measured if r["engine"] == "llama.cpp"
                 or (r["engine"] == "transformers" and r["config"] == row["dtype"])]
        row["vs"] = {f"{p['engine']} {p['config']}": {m: row[m] / p[m] for m in METRICS if row.get(m) and p.get(m)}
                     for p in peers}


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(headers: list[str], lines: list[list[str]], text_columns: int) -> str:
    """An aligned markdown table: the first `text_columns` columns left, then numbers right, and a
    last "note" column left."""
    widths = [max(len(x) for x in col) for col in zip(headers, *lines)]
    numeric = [text_columns <= i and headers[i] != "note" for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if right else c.ljust(w)
                                 for c, w, right in zip(cells, widths, numeric)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + (":" if right else "-") for w, right in zip(widths, numeric)) + " |"
    return "\n".join([line(headers), rule] + [line(cells) for cells in lines])


def speed_table(rows: list[dict], batch: int, bandwidth_gb_s: float) -> str:
    headers = ["engine", "config", "prefill tok/s", "decode tok/s b1", f"decode tok/s b{batch}", "peak MiB",
               "weights MiB", "GB/s", f"% of {bandwidth_gb_s:.1f} GB/s", "limit tok/s", "note"]
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append([r["engine"], r["config"]] + ["-"] * (len(headers) - 3) + [f"skipped: {r['skipped']}"])
            continue
        lines.append([r["engine"], r["config"], _num(r["prefill_tok_s"], ".1f"), _num(r["decode_b1_tok_s"], ".1f"),
                      _num(r.get("decode_bn_tok_s"), ".1f"), _num(r["peak_rss_mib"], ".0f"),
                      _num(r["weight_bytes"] / 2**20, ".1f"), _num(r.get("gb_s"), ".2f"),
                      _num(r.get("bandwidth_pct"), ".0f"), _num(r.get("bandwidth_limit_tok_s"), ".0f"),
                      ""])
    return render(headers, lines, text_columns=2)


def ratio_table(rows: list[dict], batch: int) -> str:
    headers = ["ours / peer", "prefill", "decode b1", f"decode b{batch}"]
    lines = [[f"{r['config']} / {peer}"] + [_num(ratios.get(m), ".2f") + ("x" if m in ratios else "") for m in METRICS]
             for r in rows for peer, ratios in r.get("vs", {}).items()]
    return render(headers, lines, text_columns=1) if lines else ""
