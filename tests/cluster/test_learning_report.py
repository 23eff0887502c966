"""The learning report turns bench JSON into a table and a plot of every seed."""

import json

from cluster.learning_report import evaluated, main


def _run(seed, finals):
    return {"seed": seed, "final_eval_return": finals[-1], "random_return": 30.0 + seed,
            "curve": {"env_steps": [100, 200, 300], "seconds": [10.0, 21.0, 30.0 + seed],
                      "eval_return": [None, finals[0], finals[1]]}}


def test_table_and_plot_from_bench_json(tmp_path, capsys):
    report = {"task": "dm_control:cartpole-swingup", "budget_minutes": 9.5,
              "runs": [_run(0, [100.0, 700.0]), _run(1, [120.0, 800.0]), _run(2, [90.0, 750.0])]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    main([str(path), "--out", str(tmp_path / "learning")])
    table = (tmp_path / "learning_table.md").read_text()
    row = table.splitlines()[2]
    assert row.startswith("| cartpole-swingup | 3 | 9.5 min | 700, 800, 750 | 750 [")
    assert "| 750 | 31 | 300 |" in row  # median, mean random return, env steps
    assert (tmp_path / "learning.png").stat().st_size > 10_000
    assert "cartpole-swingup" in capsys.readouterr().out


def test_only_evaluated_cycles_are_points():
    curve = {"env_steps": [1, 2, 3], "eval_return": [None, 5.0, None]}
    assert evaluated(curve, "env_steps") == ([2], [5.0])
