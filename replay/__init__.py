"""Replay data plane: specs and types (import-light), Reverb tables/adders/datasets, the archive.

Only `spec` is re-exported here; Reverb-backed modules (`server`, `adders`, `dataset`) import
reverb lazily and must be imported explicitly.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ info lines, once imported

from replay.spec import Adder, Batch, EnvSpec, Episode, Lineage, TaskSpec

__all__ = ["Adder", "Batch", "EnvSpec", "Episode", "Lineage", "TaskSpec"]
