"""Long-running services started from the command line (outside a `pacflow run`)."""

from __future__ import annotations

from pathlib import Path

from cluster.config import ExperimentConfig
from cluster.shutdown import ShutdownSignals
from replay.server import ReplayServer


def serve_replay(config: ExperimentConfig, directory: Path, host: str, port: int,
                 checkpoint_period_seconds: float) -> int:
    """Runs the Reverb server until SIGINT/SIGTERM; checkpoints every period and at shutdown."""
    spec = config.env.spec()
    server = ReplayServer(spec, config.replay, directory, host=host, port=port or None)
    stop = ShutdownSignals()
    print(f"replay serving table {config.replay.table!r} on {server.address} "
          f"({server.num_items()} items restored from {directory})", flush=True)
    while not stop.wait(checkpoint_period_seconds):
        print(f"checkpoint {server.checkpoint()}", flush=True)
    print(f"checkpoint {server.checkpoint()} ({server.num_items()} items); stopping", flush=True)
    server.stop()
    return 0
