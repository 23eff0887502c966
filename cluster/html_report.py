"""`report/index.html`: one self-contained page per run (no network: figures are inline SVG
images as data: URIs, the style is inline, there is no script).

    path = write_html_report("runs/exp1")    # or an s3:// run; returns where the page went

Sections: summary, returns (per task, vs environment steps and vs wall clock, collect and eval,
with each row's spread), learner terms over learner steps, throughput and staleness,
quarantine reasons, the lineage of each published version, the cycle table. A source that is
missing or unreadable is named where its section would be. What is read, and from where, is in
cluster/report_data.py.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Iterable, Sequence

from cluster.report import COLUMNS
from cluster.report_data import (HISTORY_DIR, LEARNER_TERMS, RunData, Spread, cumulative_minutes,
                                 env_steps_per_second, gather, quarantine_counts, return_spread,
                                 version_lineage, versions_behind)
from replay.storage import Storage, join, run_id

INDEX = "report/index.html"
Panel = tuple[Sequence[float], Sequence[float], str, str]  # x, y, title, x label
MODES = (("collect", "collect (sampled policy)", "C0"), ("eval", "eval (greedy policy)", "C1"))
STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; max-width: 40em; overflow-wrap: anywhere; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; }
figcaption, .note { color: #555; font-size: 0.9em; }
p.missing { background: #fff4e0; border-left: 4px solid #e0a030; padding: 0.4em 0.8em; }
"""


def write_html_report(run: str) -> str:
    """Gathers the run's sources, renders the page into `report/index.html` of run storage;
    returns its path (local) or URI."""
    store = Storage(run)
    store.put_bytes(INDEX, render(gather(store.uri)).encode())
    return store.path(INDEX) if store.local else join(store.uri, INDEX)


def render(data: RunData) -> str:
    """The whole page for what `gather` read."""
    sections = [_summary(data), _returns(data), _learner(data), _throughput(data),
                _quarantine(data), _lineage(data), _cycles(data)]
    title = html.escape(f"pacflow run {run_id(data.run)}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n"
            f"<p class=\"note\">{html.escape(data.run)}</p>\n" + "\n".join(sections)
            + "\n</body></html>\n")


# -- sections --------------------------------------------------------------------------------

def _summary(data: RunData) -> str:
    last = data.rows[-1] if data.rows else None
    modes = {m: sum(e.mode == m for e in data.episodes) for m, _, _ in MODES}
    items = [("mode", data.state.get("mode", "cycles")), ("cycles", len(data.rows)),
             ("env_steps", last.env_steps if last else None),
             ("learner_steps", last.learner_steps if last else None),
             ("policy_version", last.policy_version if last else None),
             ("wall_minutes", f"{cumulative_minutes(data.rows)[-1]:.1f}" if last else None),
             ("archived_collect_episodes", modes["collect"]),
             ("archived_eval_episodes", modes["eval"]),
             ("published_versions", len(data.snapshots)),
             ("quarantined_episodes", len(data.quarantine))]
    body = "".join(f"<tr><th>{k}</th><td data-key=\"{k}\">{_cell(v)}</td></tr>"
                   for k, v in items)
    missing = "".join(_missing(source, why) for source, why in sorted(data.missing.items()))
    return _section("summary", "Summary", missing + f"<table>{body}</table>")


def _returns(data: RunData) -> str:
    if not data.rows or not data.episodes:
        why = "no cycle rows (cycle.json)" if not data.rows else "no archived episodes"
        return _section("returns", "Returns", f"<p class=\"missing\">Nothing to plot: {why}.</p>")
    mode = data.state.get("mode", "cycles")
    spreads = return_spread(data.episodes, data.rows, mode)
    tasks = sorted({s.task for s in spreads})
    fig = _returns_figure(spreads, tasks, [r.env_steps for r in data.rows],
                          cumulative_minutes(data.rows))
    placed = sum(s.count for s in spreads)
    caption = (f"Episode returns from the archive ({placed} of {len(data.episodes)} episodes "
               "fall in a cycle row), per task. Line: the mean of a row's episodes; band: their "
               "min to max; darker band: 25th to 75th percentile. x: the row's cumulative "
               "environment steps and wall-clock minutes (cycle.json). "
               + ("Async run: a collected episode counts in the first row that published a "
                  "version newer than the one that acted; an evaluation in its version's row."
                  if mode == "async" else "An episode counts in the row of its lineage cycle."))
    return _section("returns", "Returns", _figure("returns", fig, caption))


def _learner(data: RunData) -> str:
    if not data.history:
        last = data.state.get("last_train_metrics") or {}
        shown = {k: v for k, v in last.items() if isinstance(v, (int, float))}
        table = _table(["metric", "value"], [[k, v] for k, v in sorted(shown.items())])
        return _section("learner", "Learner", _missing(HISTORY_DIR, data.missing.get(
            HISTORY_DIR, "no learner history")) + (
            "<p>The last train call's metrics (cycle.json <code>last_train_metrics</code>):</p>"
            + table if shown else ""))
    terms = [t for t in LEARNER_TERMS if any(t in h for h in data.history)]
    fig = _panels_figure([_history_panel(data.history, t) for t in terms])
    caption = (f"One point per window of learner updates ({len(data.history)} windows, "
               f"{HISTORY_DIR}/*.jsonl), at the learner step count after the window.")
    skipped = (f"<p class=\"note\">{data.history_skipped} history lines were skipped (not a "
               "JSON object with learner_steps).</p>" if data.history_skipped else "")
    return _section("learner", "Learner", _figure("learner", fig, caption) + skipped)


def _throughput(data: RunData) -> str:
    parts = []
    if data.rows:
        panels = [([r.cycle for r in data.rows], env_steps_per_second(data.rows),
                   "env_steps_per_second", "cycle")]
        if data.history:
            panels += [_history_panel(data.history, t)
                       for t in ("updates_per_second", "data_wait_fraction")]
        parts.append(_figure("throughput", _panels_figure(panels),
                             "Environment steps per second of each cycle row (cycle.json); "
                             "learner updates per second and the fraction of time it waited "
                             f"for data, per window ({HISTORY_DIR})."))
    if not data.history:
        parts.append(_missing(HISTORY_DIR, "learner updates/s and data wait need the learner "
                              "history"))
    busy = data.state.get("busy_fraction") or {}
    stale = data.state.get("staleness") or {}
    rows = [[f"busy fraction, {k}", f"{v:.3f}"] for k, v in sorted(busy.items())]
    rows += [[f"staleness {k} (versions, over collected steps)", _cell(v)]
             for k, v in sorted(stale.items())]
    parts.append(_table(["cycle.json", "value"], rows) if rows else
                 _missing("cycle.json", "no busy_fraction or staleness recorded"))
    behind = versions_behind(data.episodes, data.snapshots)
    if behind:
        counts = _count(behind.values())
        parts.append("<p>Collected episodes by how many versions had been published past the "
                     "one that acted when the episode ended (snapshot file times against the "
                     "episode's end time; clocks of different machines may differ):</p>"
                     + _table(["versions behind", "episodes"], sorted(counts.items())))
    return _section("throughput", "Throughput and staleness", "".join(parts))


def _quarantine(data: RunData) -> str:
    if "quarantine" in data.missing:
        return _section("quarantine", "Quarantine",
                        _missing("quarantine", data.missing["quarantine"]))
    if not data.quarantine:
        return _section("quarantine", "Quarantine",
                        "<p>No episode was quarantined (quarantine/*.reason.json).</p>")
    rows = quarantine_counts(data.quarantine)
    return _section("quarantine", "Quarantine", "<p>Rejected episodes by their first reason "
                    "(quarantine/*.reason.json):</p>"
                    + _table(["reason", "episodes", "example"], rows, text_columns=(0, 2)))


def _lineage(data: RunData) -> str:
    if not data.snapshots:
        return _section("lineage", "Policy lineage",
                        _missing("policies", data.missing.get("policies", "no snapshots")))
    rows = [[v["version"], v["cycle"], v["learner_step"], v["parent_version"],
             "; ".join(f"{k}={_short(x)}" for k, x in sorted(v["origin"].items())),
             v["sha256"], v["collect_episodes"], v["eval_episodes"], v["eval_return"],
             v["earlier_episodes"], v["earlier_env_steps"]]
            for v in version_lineage(data.snapshots, data.episodes, data.action_repeat)]
    header = ["version", "cycle", "learner_step", "parent", "origin", "sha256",
              "collect eps", "eval eps", "eval return", "earlier eps", "earlier env steps"]
    return _section("lineage", "Policy lineage", (
        "<p>Each published version (policies/v*.json metadata); the episodes it acted in; and "
        "the collected episodes and environment steps in the archive acted by earlier "
        "versions: the data it could have been trained on.</p>")
        + _table(header, rows, text_columns=(4, 5)))


def _cycles(data: RunData) -> str:
    names = [name for name, _, _ in COLUMNS]
    rows = [[getattr(r, n) for n in names] for r in data.rows]
    return _section("cycles", "Cycles", _table(names, rows) if rows else
                    _missing("cycle.json", data.missing.get("cycle.json", "no rows")))


# -- figures ---------------------------------------------------------------------------------

def _returns_figure(spreads: Sequence[Spread], tasks: Sequence[str], env_steps: Sequence[int],
                    minutes: Sequence[float]):
    plt = _pyplot()
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.4 * len(tasks)), squeeze=False)
    for (ax_steps, ax_wall), task in zip(axes, tasks):
        for ax, xs, label in ((ax_steps, env_steps, "environment steps"),
                              (ax_wall, minutes, "wall-clock minutes")):
            for mode, name, color in MODES:
                group = [s for s in spreads if s.task == task and s.mode == mode]
                if not group:
                    continue
                x = [xs[s.row] for s in group]
                ax.fill_between(x, [s.low for s in group], [s.high for s in group],
                                color=color, alpha=0.15, linewidth=0)
                ax.fill_between(x, [s.q25 for s in group], [s.q75 for s in group],
                                color=color, alpha=0.3, linewidth=0)
                ax.plot(x, [s.mean for s in group], "o-", color=color, label=name, ms=3)
            ax.set_xlabel(label)
            ax.set_ylabel("episode return")
            ax.set_title(task, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return fig


def _history_panel(history: Sequence[dict[str, Any]], key: str) -> Panel:
    """`key` of the learner windows that have it, over learner steps."""
    points = [(h["learner_steps"], h[key]) for h in history
              if isinstance(h.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points], key, "learner steps"


def _panels_figure(panels: Sequence[Panel]):
    """One small line plot per panel, three to a row."""
    plt = _pyplot()
    cols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.7 * cols, 2.8 * nrows), squeeze=False)
    for ax, (xs, ys, title, xlabel) in zip(axes.flat, panels):
        ax.plot(xs, ys, ".-", ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    return fig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(name: str, fig, caption: str) -> str:
    """A matplotlib figure as an inline SVG image with its caption."""
    fig.tight_layout()
    svg = io.BytesIO()
    fig.savefig(svg, format="svg", metadata={"Date": None})
    _pyplot().close(fig)
    data = base64.b64encode(svg.getvalue()).decode()
    return (f"<figure id=\"fig-{name}\"><img alt=\"{name}\" src=\"data:image/svg+xml;base64,"
            f"{data}\"><figcaption>{html.escape(caption)}</figcaption></figure>")


# -- html helpers ----------------------------------------------------------------------------

def _section(anchor: str, title: str, body: str) -> str:
    return f"<section id=\"{anchor}\"><h2>{title}</h2>\n{body}</section>"


def _missing(source: str, why: str) -> str:
    return (f"<p class=\"missing\" data-source=\"{html.escape(source)}\">Not shown: "
            f"<code>{html.escape(source)}</code>: {html.escape(why)}.</p>")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]],
           text_columns: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f"<td{' class=text' if i in text_columns else ''}>{_cell(v)}</td>"
        for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return html.escape(str(value))


def _short(value: Any, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _count(values: Iterable[int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts
