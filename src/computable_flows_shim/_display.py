"""Notebook and text displays of a checkpoint view, a run, a store and a diff.

The HTML follows xarray's look: a header line, then collapsible sections (``<details>``)
with tables in a small monospace font, colors taken from the Jupyter theme when there is
one.  Everything shown comes from metadata (attributes, ``zarr.json`` files, file sizes):
displaying never reads a chunk.  Every value is escaped.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

PHASE_COLORS = {"GREEN": "#2ca02c", "AMBER": "#ff9f0e", "RED": "#d62728"}

_CSS = """<style>
.cfs-wrap{font-family:var(--jp-code-font-family,monospace);font-size:12px;line-height:1.45;
  color:var(--jp-content-font-color0,inherit);max-width:1100px}
.cfs-head{font-weight:600;margin-bottom:2px}.cfs-head .cfs-kind{color:var(--jp-content-font-color2,#777)}
.cfs-sub{color:var(--jp-content-font-color2,#666);margin-bottom:4px}
.cfs-wrap details{margin:2px 0 2px 0;border-left:2px solid var(--jp-border-color2,#ddd);padding-left:6px}
.cfs-wrap summary{cursor:pointer;font-weight:600}
.cfs-wrap summary .cfs-n{font-weight:400;color:var(--jp-content-font-color2,#777)}
.cfs-wrap table{border-collapse:collapse;margin:2px 0 4px 0}
.cfs-wrap th{text-align:left;font-weight:600;color:var(--jp-content-font-color2,#555);padding:1px 10px 1px 0;
  border-bottom:1px solid var(--jp-border-color2,#ddd)}
.cfs-wrap td{padding:1px 10px 1px 0;vertical-align:top;text-align:left}
.cfs-wrap td.cfs-r{text-align:right}
.cfs-wrap pre{margin:2px 0;white-space:pre-wrap;font-size:11px}
.cfs-badge{display:inline-block;padding:0 5px;margin-right:3px;border-radius:3px;color:#fff;font-size:11px}
.cfs-dim{color:var(--jp-content-font-color2,#888)}
</style>"""


def human_bytes(n: int) -> str:
    """``1.5 MiB``."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{int(x)} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    raise AssertionError("unreachable")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=cfs-r' if i in right else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(title: str, count: str, content: str, open_: bool = True) -> str:
    n = f" <span class=cfs-n>{_e(count)}</span>" if count else ""
    return f"<details{' open' if open_ else ''}><summary>{_e(title)}{n}</summary>{content}</details>"


def _badges(counts: dict) -> str:
    return "".join(
        f"<span class=cfs-badge style='background:{PHASE_COLORS.get(k, '#7f7f7f')}'>{_e(k)} {_e(v)}</span>"
        for k, v in counts.items()
    )


def _json_pre(obj: Any) -> str:
    return f"<pre>{_e(json.dumps(obj, indent=1, ensure_ascii=False, default=str))}</pre>"


def _kv_table(d: dict) -> str:
    rows = []
    for k, v in d.items():
        cell = (
            _badges(v)
            if k == "phase_counts" and isinstance(v, dict)
            else _e(_num(v) if not isinstance(v, (dict, list)) else json.dumps(v))
        )
        rows.append((f"<b>{_e(k)}</b>", cell))
    return _table(("name", "value"), rows)


# ---------------------------------------------------------------- summaries in words


def telemetry_line(s: dict) -> str:
    """``200 samples (iter 1..200), 10 events, final E 5.06669, ...`` from a telemetry_summary."""
    parts = [f"{s.get('samples', 0)} samples"]
    if "first_iter" in s and "last_iter" in s:
        parts[0] += f" (iter {s['first_iter']}..{s['last_iter']})"
    parts.append(f"{s.get('events', 0)} events")
    for key, label in (("final_energy", "final E"), ("final_grad_norm", "final grad_norm")):
        if key in s:
            parts.append(f"{label} {_num(s[key])}")
    if isinstance(s.get("phase_counts"), dict) and s["phase_counts"]:
        parts.append("phases " + " ".join(f"{k}={v}" for k, v in s["phase_counts"].items()))
    return ", ".join(parts)


def lineage_line(lineage: dict) -> str:
    if not lineage:
        return "none (not made by a rollback)"
    return (
        f"branched from {lineage.get('rollback_from')} "
        f"(run {lineage.get('parent_run_id')}, iteration {lineage.get('parent_iteration')})"
    )


def _short_json(obj: Any, width: int = 100) -> str:
    text = json.dumps(obj, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _leaf_cells(leaf: Any) -> tuple[str, str, str, str, str, str, str]:
    if leaf.kind == "scalar":
        return leaf.name, type(leaf.value).__name__, "", repr(leaf.value), "", "", ""
    dtype = leaf.dtype + (f" (key {leaf.key_impl})" if leaf.key_impl else "")
    grid = "x".join(map(str, leaf.grid)) if leaf.grid else "1"
    return (
        leaf.name,
        dtype,
        str(leaf.shape),
        getattr(leaf, "packed", None) or str(leaf.chunk_shape),  # a packed leaf: its pack and range
        f"{grid} ({leaf.nchunks})",
        human_bytes(leaf.nbytes),
        human_bytes(leaf.disk_bytes),
    )


_LEAF_HEADERS = ("leaf", "dtype", "shape", "chunks", "grid", "size", "on disk")

# ---------------------------------------------------------------- checkpoint view


def view_text(view: Any, leaves: list, disk: int) -> str:
    """A checkpoint view as text, given its leaves (``LeafInfo``) and bytes on disk."""
    arrays = [leaf for leaf in leaves if leaf.kind == "array"]
    lines = [
        f"<CheckpointView {view.checkpoint_id}>",
        f"run: {view.run_id}  iteration: {view.iteration}  created: {view.created_at}",
        f"path: {view.path}",
        f"state: {len(leaves)} leaves, {human_bytes(sum(a.nbytes for a in arrays))} "
        f"({human_bytes(disk)} on disk, whole checkpoint)",
    ]
    cells = [_leaf_cells(leaf) for leaf in leaves]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(_LEAF_HEADERS)]
    for row in [_LEAF_HEADERS, *cells]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    lines.append(f"telemetry: {telemetry_line(view.telemetry_summary)}")
    lines.append(f"lineage: {lineage_line(view.lineage)}")
    for name in ("certificates", "flow_config", "metadata"):
        lines.append(f"{name}: {_short_json(getattr(view, name))}")
    return "\n".join(lines)


def view_html(view: Any, leaves: list, disk: int) -> str:
    """A checkpoint view as HTML, given its leaves (``LeafInfo``) and bytes on disk."""
    arrays = [leaf for leaf in leaves if leaf.kind == "array"]
    rows = [tuple(_e(c) for c in _leaf_cells(leaf)) for leaf in leaves]
    state = _table(_LEAF_HEADERS, rows, right=(5, 6))
    lin = view.lineage
    parts = [
        _CSS,
        "<div class=cfs-wrap>",
        f"<div class=cfs-head><span class=cfs-kind>CheckpointView</span> {_e(view.checkpoint_id)}</div>",
        f"<div class=cfs-sub>run <b>{_e(view.run_id)}</b> · iteration <b>{_e(view.iteration)}</b> · "
        f"{_e(view.created_at)} · {human_bytes(disk)} on disk · <span class=cfs-dim>{_e(view.path)}</span></div>",
        _section("State", f"{len(leaves)} leaves, {human_bytes(sum(a.nbytes for a in arrays))}", state),
        _section("Telemetry summary", "", _kv_table(view.telemetry_summary)),
        _section("Lineage", "" if lin else "none", _e(lineage_line(lin)) if lin else "", open_=bool(lin)),
        _section("Certificates", str(len(view.certificates)), _kv_table(view.certificates), open_=False),
        _section("Flow config", "", _json_pre(view.flow_config), open_=False),
        _section("Metadata", str(len(view.metadata)), _json_pre(view.metadata), open_=False),
        "</div>",
    ]
    return "".join(parts)


# ---------------------------------------------------------------- run


def _ckpt_row(c: Any) -> tuple[str, str, str, str, str]:
    s = c.telemetry_summary
    e = s.get("final_energy")
    g = s.get("final_grad_norm")
    return c.checkpoint_id, str(c.iteration), c.created_at, "" if e is None else _num(e), "" if g is None else _num(g)


def run_text(run: Any) -> str:
    span = f"iterations {run.first_iteration}..{run.last_iteration}"
    lines = [f"<Run {run.run_id}: {len(run.checkpoints)} checkpoints, {span}>"]
    if run.branched_from:
        lines.append(f"branched from {run.branched_from} (run {run.parent_run_id}, iteration {run.branch_iteration})")
    if run.children:
        lines.append(f"branches: {', '.join(run.children)}")
    lines.append(f"telemetry (latest): {telemetry_line(run.telemetry_summary)}")
    lines.append("checkpoints:")
    for cid, it, created, e, _g in (_ckpt_row(c) for c in run.checkpoints):
        lines.append(f"  {cid:<40} {it:>10}  {created}  {('E=' + e) if e else ''}".rstrip())
    return "\n".join(lines)


def run_html(run: Any) -> str:
    lin = ""
    if run.branched_from:
        lin = (
            f"branched from <b>{_e(run.branched_from)}</b> (run {_e(run.parent_run_id)}, "
            f"iteration {_e(run.branch_iteration)})"
        )
    kids = f"<div>branches: {_e(', '.join(run.children))}</div>" if run.children else ""
    rows = [tuple(_e(c) for c in _ckpt_row(c)) for c in run.checkpoints]
    table = _table(("checkpoint", "iteration", "created (UTC)", "final E", "final grad_norm"), rows, right=(1, 3, 4))
    return "".join(
        [
            _CSS,
            "<div class=cfs-wrap>",
            f"<div class=cfs-head><span class=cfs-kind>Run</span> {_e(run.run_id)}</div>",
            f"<div class=cfs-sub>{len(run.checkpoints)} checkpoints · iterations {run.first_iteration}.."
            f"{run.last_iteration}</div>",
            _section("Lineage", "" if lin else "none", lin + kids, open_=bool(lin or kids)),
            _section("Telemetry summary (latest checkpoint)", "", _kv_table(run.telemetry_summary)),
            _section("Checkpoints", str(len(run.checkpoints)), table),
            "</div>",
        ]
    )


# ---------------------------------------------------------------- store


def store_text(title: str, runs: list, tree_text: str, du: Any) -> str:
    """A store as text: ``title`` (its repr), its runs (``RunInfo``) drawn as ``tree_text``, disk usage."""
    n = sum(len(r.checkpoints) for r in runs)
    head = f"{title}\n{len(runs)} runs, {n} checkpoints, {human_bytes(du.total_bytes)} on disk"
    return head + ("\n" + tree_text if runs else "")


def store_html(root: str, runs: list, tree: list, du: Any) -> str:
    """A store as HTML: its location, its runs (``RunInfo``) in tree order (``(run, prefix,
    connector)``, as ``walk_tree`` gives them) and disk usage (``DiskUsage``)."""
    by_run = {r.run_id: r for r in du.runs}
    n = sum(len(r.checkpoints) for r in runs)
    rows = []
    for r, prefix, conn in tree:
        s = r.telemetry_summary
        e = s.get("final_energy")
        phases = s.get("phase_counts") if isinstance(s.get("phase_counts"), dict) else {}
        usage = by_run.get(r.run_id)
        rows.append(
            (
                f"<span class=cfs-dim style='white-space:pre'>{_e(prefix + conn)}</span><b>{_e(r.run_id)}</b>",
                str(len(r.checkpoints)),
                f"{r.first_iteration}..{r.last_iteration}",
                "" if e is None else _e(_num(e)),
                _badges(phases),
                _e(r.branched_from or ""),
                human_bytes(usage.bytes) if usage else "",
            )
        )
    table = _table(
        ("run", "checkpoints", "iterations", "final E", "phases", "branched from", "on disk"), rows, right=(1, 3, 6)
    )
    return "".join(
        [
            _CSS,
            "<div class=cfs-wrap>",
            f"<div class=cfs-head><span class=cfs-kind>CheckpointManager</span> {_e(os.fspath(root))}</div>",
            f"<div class=cfs-sub>{len(runs)} runs · {n} checkpoints · {human_bytes(du.total_bytes)} on disk "
            "(hard-linked files counted once)</div>",
            _section("Runs", str(len(runs)), table),
            "</div>",
        ]
    )


# ---------------------------------------------------------------- diff


def _diff_cells(leaf: Any) -> tuple[str, str, str, str, str]:
    shape = str(leaf.shape_a) if leaf.shape_a == leaf.shape_b else f"{leaf.shape_a} -> {leaf.shape_b}"
    dtype = leaf.dtype_a if leaf.dtype_a == leaf.dtype_b else f"{leaf.dtype_a} -> {leaf.dtype_b}"
    if leaf.shape_a is None and leaf.shape_b is None:  # Python scalars
        shape, dtype = "", ""
        if leaf.status != "identical":
            shape = f"{leaf.value_a!r} -> {leaf.value_b!r}"
    changed = str(leaf.changed_elements) if leaf.status in ("changed", "identical") and leaf.shape_a is not None else ""
    d = "" if leaf.max_abs_diff is None else f"{leaf.max_abs_diff:.6g}"
    return leaf.name, leaf.status, f"{shape} {dtype}".strip(), changed, d


def _value(v: Any, width: int) -> str:
    return _num(v) if isinstance(v, float) else _short_json(v, width)


def attr_changes(diff: Any) -> list[tuple[str, Any, Any]]:
    """The attributes that differ, objects opened one level: ``("telemetry_summary.samples", 100, 200)``."""
    missing = "(absent)"
    out: list[tuple[str, Any, Any]] = []
    for k, (x, y) in diff.attrs.items():
        if isinstance(x, dict) and isinstance(y, dict):
            for sub in list(x) + [s for s in y if s not in x]:
                vx, vy = x.get(sub, missing), y.get(sub, missing)
                if json.dumps(vx, sort_keys=True, default=str) != json.dumps(vy, sort_keys=True, default=str):
                    out.append((f"{k}.{sub}", vx, vy))
        else:
            out.append((k, x, y))
    return out


_DIFF_HEADERS = ("leaf", "status", "shape / dtype", "changed", "max |a-b|")


def diff_text(diff: Any) -> str:
    cells = [_diff_cells(leaf) for leaf in diff.leaves]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(_DIFF_HEADERS)]
    n_changed = len(diff.changed)
    lines = [
        f"a: {diff.a}",
        f"b: {diff.b}",
        f"{len(diff.leaves)} leaves: {len(diff.leaves) - n_changed} identical, {n_changed} differ",
    ]
    for row in [_DIFF_HEADERS, *cells]:
        lines.append(
            "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        )
    if diff.attrs:
        lines.append("attributes that differ:")
        for k, x, y in attr_changes(diff):
            lines.append(f"  {k}: {_value(x, 60)} -> {_value(y, 60)}")
    return "\n".join(lines)


def diff_html(diff: Any) -> str:
    rows = []
    for leaf in diff.leaves:
        name, status, sd, changed, d = _diff_cells(leaf)
        color = "#2ca02c" if status == "identical" else "#d62728"
        rows.append((_e(name), f"<span style='color:{color}'>{_e(status)}</span>", _e(sd), changed, d))
    attrs = _table(
        ("attribute", "a", "b"),
        [(_e(k), _e(_value(x, 80)), _e(_value(y, 80))) for k, x, y in attr_changes(diff)],
    )
    n_changed = len(diff.changed)
    return "".join(
        [
            _CSS,
            "<div class=cfs-wrap>",
            f"<div class=cfs-head><span class=cfs-kind>CheckpointDiff</span> {_e(diff.a)} → {_e(diff.b)}</div>",
            f"<div class=cfs-sub>{len(diff.leaves) - n_changed} identical · {n_changed} differ</div>",
            _section("Leaves", str(len(diff.leaves)), _table(_DIFF_HEADERS, rows, right=(3, 4))),
            _section("Attributes that differ", str(len(diff.attrs)), attrs, open_=bool(diff.attrs)),
            "</div>",
        ]
    )


__all__ = ["view_html", "view_text", "run_html", "run_text", "store_html", "store_text", "diff_html", "diff_text"]
