"""Replay data plane: specs and types (import-light), Reverb tables/adders/datasets, the archive.

Only `spec` is re-exported here; Reverb-backed modules (`server`, `adders`, `dataset`) import
reverb lazily and must be imported explicitly.
"""

from replay.spec import Adder, Batch, EnvSpec, Episode, Lineage

__all__ = ["Adder", "Batch", "EnvSpec", "Episode", "Lineage"]
