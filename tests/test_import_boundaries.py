"""DESIGN.md §1 import boundaries, checked on the source and in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actors", "cluster", "learners", "policies", "replay")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "proto" not in path.parts:
                yield package, path, _imports(path)


def test_ray_only_in_cluster():
    leaks = [str(p) for pkg, p, names in _modules() if "ray" in names and pkg != "cluster"]
    assert leaks == []


def test_reverb_and_tensorflow_only_in_replay():
    leaks = [str(p) for pkg, p, names in _modules()
             if names & {"reverb", "tensorflow"} and pkg != "replay"]
    assert leaks == []


def test_nothing_imports_cluster():
    leaks = [str(p) for pkg, p, names in _modules() if "cluster" in names and pkg != "cluster"]
    assert leaks == []


def test_library_packages_import_without_ray_reverb_or_tensorflow():
    code = (
        "import sys\n"
        "import replay, replay.spec, replay.config, replay.archive, replay.validation\n"
        "import policies.perceiver, policies.policy, policies.snapshot, policies.server\n"
        "import learners.losses, learners.learner, learners.checkpoints\n"
        "import actors.envs, actors.loop\n"
        "bad = sorted(m for m in ('ray', 'reverb', 'tensorflow', 'cluster') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
