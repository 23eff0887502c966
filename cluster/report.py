"""The per-cycle table, `cycle.json` and `report/returns.png`, in run storage."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Sequence

from replay.storage import Storage, join

STATE = "cycle.json"  # rows and driver state, rewritten atomically after every cycle
REPORT_PNG = "report/returns.png"


@dataclasses.dataclass(frozen=True)
class CycleRow:
    """One finished collect -> train -> evaluate -> publish cycle."""

    cycle: int  # 0-based cycle index
    env_steps: int  # environment steps collected so far (action repeats counted)
    episodes: int  # collected (not eval) episodes so far
    collect_return: float  # mean return of this cycle's collected episodes
    eval_return: float | None  # mean return of the cycle's greedy evaluation; None = not evaluated
    learner_steps: int  # learner updates so far
    policy_version: int  # version published at the end of the cycle
    seconds: float  # wall time of the cycle


COLUMNS = [("cycle", 5, "d"), ("env_steps", 10, "d"), ("episodes", 8, "d"),
           ("collect_return", 14, ".1f"), ("eval_return", 11, ".1f"),
           ("learner_steps", 13, "d"), ("policy_version", 14, "d"), ("seconds", 7, ".1f")]


def format_header() -> str:
    return "  ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)


def format_row(row: CycleRow) -> str:
    def cell(name: str, width: int, fmt: str) -> str:
        value = getattr(row, name)
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"

    return "  ".join(cell(*column) for column in COLUMNS)


def write_state(run_dir: str | Path, rows: Sequence[CycleRow], extra: dict) -> None:
    """Atomically rewrites `cycle.json` (in a run folder or storage URI) with every finished
    cycle."""
    state = {"completed_cycles": len(rows), "rows": [dataclasses.asdict(r) for r in rows],
             **extra}
    Storage(run_dir).put_bytes(STATE, json.dumps(state, indent=1).encode())


def read_state(run_dir: str | Path) -> dict:
    """The whole `cycle.json`: rows and what the driver stored beside them."""
    return json.loads(Storage(run_dir).get_bytes(STATE))


def read_rows(run_dir: str | Path) -> list[CycleRow]:
    return [CycleRow(**r) for r in read_state(run_dir)["rows"]]


def plot_returns(rows: Sequence[CycleRow], run_dir: str | Path, title: str) -> str:
    """Draws `report/returns.png` into the run folder or storage URI; returns where it went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    cycles = [r.cycle for r in rows]
    ax.plot(cycles, [r.collect_return for r in rows], "o-", label="collect (sampled policy)")
    evaluated = [r for r in rows if r.eval_return is not None]
    ax.plot([r.cycle for r in evaluated], [r.eval_return for r in evaluated], "s-",
            label="eval (greedy policy)")
    ax.set_xlabel("cycle")
    ax.set_ylabel("mean episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    store = Storage(run_dir)
    store.put_bytes(REPORT_PNG, png.getvalue())
    return store.path(REPORT_PNG) if store.local else join(store.uri, REPORT_PNG)
