"""Property-based: random defects injected into good episodes are exactly the ones refused."""

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.validation import episode_problems
from tests.fakes import SPEC, make_episode


def _nonfinite(field):
    def apply(ep, rng):
        arr = getattr(ep, field).copy()
        flat = arr.reshape(-1)
        flat[rng.integers(0, flat.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return dataclasses.replace(ep, **{field: arr})
    return apply


DEFECTS = {
    "observation: non-finite": _nonfinite("observation"),
    "action: non-finite": _nonfinite("action"),
    "reward: non-finite": _nonfinite("reward"),
    "observation: dtype": lambda ep, rng: dataclasses.replace(
        ep, observation=ep.observation.astype(np.float64)),
    "action: shape": lambda ep, rng: dataclasses.replace(ep, action=ep.action[:, :1]),
    "discount: shape": lambda ep, rng: dataclasses.replace(ep, discount=ep.discount[:-1]),
    "policy_version: dtype": lambda ep, rng: dataclasses.replace(
        ep, policy_version=ep.policy_version.astype(np.int32)),
    "task_id": lambda ep, rng: dataclasses.replace(ep, task_id=int(rng.integers(1, 5))),
    "exactly one of terminated/truncated": lambda ep, rng: dataclasses.replace(
        ep, terminated=ep.truncated),
}


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 20), seed=st.integers(0, 2**16),
       defects=st.sets(st.sampled_from(sorted(DEFECTS)), max_size=4).filter(
           lambda d: len({n.split(":")[0] for n in d}) == len(d)))  # one defect per field
def test_exactly_the_injected_defects_are_reported(length, seed, defects):
    rng = np.random.default_rng(seed)
    episode = make_episode(length=length, seed=seed, terminated=bool(seed % 2))
    for name in sorted(defects):
        episode = DEFECTS[name](episode, rng)
    problems = episode_problems(episode, SPEC)
    assert bool(problems) == bool(defects)
    for name in defects:
        assert any(p.startswith(name) for p in problems), (name, problems)
    named = {n for n in DEFECTS if any(p.startswith(n) for p in problems)}
    assert named == defects  # nothing good is refused
