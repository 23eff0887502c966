"""`pacflow report RUN` on the smoke run: report/index.html, opened in a headless Chromium.

Needs /usr/bin/chromium (`make system-deps` installs it) and the `playwright` Python package;
the browser is the system's, never one downloaded by playwright.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.report_data import HISTORY_DIR
from replay.archive import EpisodeArchive

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
# Without these, Chromium opens background connections that a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SECTIONS = ["Summary", "Returns", "Learner", "Throughput and staleness", "Quarantine",
            "Policy lineage", "Cycles"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run `make system-deps` as root"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _report(run_dir: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "report", str(run_dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    index = run_dir / "report" / "index.html"
    assert result.stdout.splitlines()[-1] == f"report: {index}"
    return index


def _open(browser, index: Path):
    """The page, after load, with what went wrong on it and every URL it requested."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(index.as_uri(), wait_until="load")
    assert errors == []
    assert requests and all(u.startswith(("file://", "data:")) for u in requests), requests
    assert page.locator("h2").all_inner_texts() == SECTIONS
    return page


def _figures(page) -> dict[str, tuple[float, float, int]]:
    """figure id -> (rendered width, height, the image's decoded width)."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('figure')]
        .map(f => { const img = f.querySelector('img'), box = img.getBoundingClientRect();
                    return [f.id, [box.width, box.height, img.naturalWidth]]; }))""")


def _table(page, section: str) -> list[list[str]]:
    return page.evaluate(f"""() => [...document.querySelectorAll('#{section} tbody tr')]
        .map(tr => [...tr.cells].map(td => td.innerText))""")


def _number(text: str) -> float | None:
    return None if text == "-" else float(text)


def test_the_smoke_runs_page_shows_its_cycles_archive_and_versions(smoke_run, browser):
    run_dir, _, _ = smoke_run
    page = _open(browser, _report(run_dir))
    state = json.loads((run_dir / "cycle.json").read_text())
    rows = state["rows"]
    episodes = EpisodeArchive(run_dir / "archive").episode_table().to_pylist()
    history = sorted((run_dir / HISTORY_DIR).glob("*.jsonl"))
    figures = _figures(page)
    expected = ["fig-returns", "fig-learner", "fig-throughput"] if history else \
        ["fig-returns", "fig-throughput"]
    assert list(figures) == expected
    for name, (width, height, decoded) in figures.items():
        assert width > 300 and height > 150 and decoded > 0, name
    if not history:  # the page says so instead of plotting the learner
        assert page.locator(f'#learner p.missing[data-source="{HISTORY_DIR}"]').is_visible()

    summary = {k: page.inner_text(f'[data-key="{k}"]') for k in (
        "env_steps", "learner_steps", "policy_version", "archived_collect_episodes",
        "archived_eval_episodes", "published_versions", "quarantined_episodes")}
    assert summary == {
        "env_steps": str(rows[-1]["env_steps"]), "learner_steps": str(rows[-1]["learner_steps"]),
        "policy_version": str(rows[-1]["policy_version"]),
        "archived_collect_episodes": str(sum(e["mode"] == "collect" for e in episodes)),
        "archived_eval_episodes": str(sum(e["mode"] == "eval" for e in episodes)),
        "published_versions": str(len(list((run_dir / "policies").glob("v*.json")))),
        "quarantined_episodes": str(len(list((run_dir / "quarantine").glob("*.reason.json"))))}
    assert f"({len(episodes)} of {len(episodes)} episodes" in page.inner_text("#returns")

    cycles = _table(page, "cycles")
    assert [[_number(c) for c in row] for row in cycles] == [
        [r["cycle"], r["env_steps"], r["episodes"], pytest.approx(r["collect_return"], 1e-3),
         pytest.approx(r["eval_return"], 1e-3) if r["eval_return"] is not None else None,
         r["learner_steps"], r["policy_version"], pytest.approx(r["seconds"], 1e-3)]
        for r in rows]
    # Version v of cycle c was trained on the episodes collected by earlier versions, which
    # are all of cycle c's and earlier: as many environment steps as the row counts.
    lineage = {int(r[0]): r for r in _table(page, "lineage")}
    assert sorted(lineage) == [r["policy_version"] for r in rows]
    for r in rows:
        assert int(lineage[r["policy_version"]][-1]) == r["env_steps"]
        assert int(lineage[r["policy_version"]][-2]) == r["episodes"]
    # Cycles mode: every collected episode acted with the newest version when it ended.
    staleness = _table(page, "throughput")[-1]
    assert staleness == ["0", str(sum(e["mode"] == "collect" for e in episodes))]


def test_a_page_with_learner_history_and_quarantined_episodes(smoke_run, browser, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir, ignore=shutil.ignore_patterns(
        "checkpoints", "replay_checkpoints*", "logs", "report"))
    folder = run_dir / HISTORY_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    windows = [{"learner_steps": s, "time": 1e9 + s, "loss": 10.0 / s, "l_imp": 1.0,
                "l_bc": 2.0, "l_q": 3.0, "temperature": 1.0 / s, "q_mean": s / 10,
                "grad_norm": 1.0, "entropy": 0.5, "updates_per_second": 30.0,
                "data_wait_fraction": 0.1} for s in range(5, 45, 5)]
    for first in (0, 20):
        (folder / f"{first:012d}.jsonl").write_text("".join(
            json.dumps(w) + "\n" for w in windows if first < w["learner_steps"] <= first + 20))
    for i, reason in enumerate(["observation: NaN at step 3", "observation: Inf at step 1",
                                "reward: NaN at step 0"]):
        (run_dir / "quarantine" / f"{i:032x}.reason.json").write_text(
            json.dumps({"episode_id": f"{i:032x}", "actor_id": "robot-r1", "reasons": [reason]}))
    page = _open(browser, _report(run_dir))
    figures = _figures(page)
    assert list(figures) == ["fig-returns", "fig-learner", "fig-throughput"]
    width, height, decoded = figures["fig-learner"]
    assert width > 300 and height > 300 and decoded > 0
    assert f"({len(windows)} windows" in page.inner_text("#fig-learner figcaption")
    assert page.locator("p.missing").count() == 0
    assert [row[:2] for row in _table(page, "quarantine")] == [["observation", "2"],
                                                                ["reward", "1"]]
    assert page.inner_text('[data-key="quarantined_episodes"]') == "3"
