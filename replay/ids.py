"""The ids that become file names, replay keys and lineage: checked at every entry point.

An episode id is 32 lowercase hex digits (a uuid's hex, as every pacflow actor and robot makes
them). A name (robot, client, actor or token identity) is 1 to 64 characters of letters, digits,
`.`, `_` and `-`, starting with a letter or digit, so it can never be `..`, absolute, or hold a
separator. Paths are built only from ids that passed these checks.
"""

from __future__ import annotations

import hashlib
import re

EPISODE_ID = re.compile(r"[0-9a-f]{32}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class InvalidIdError(ValueError):
    """An id that does not match its pattern; the message names the field."""


def episode_id_problem(value: object, field: str = "episode_id") -> str | None:
    """Why `value` is not an episode id, or None when it is one."""
    if isinstance(value, str) and EPISODE_ID.fullmatch(value):
        return None
    return f"{field}: {_shown(value)} is not 32 lowercase hex digits"


def name_problem(value: object, field: str) -> str | None:
    """Why `value` is not a safe name (robot, client, actor or identity), or None."""
    if isinstance(value, str) and NAME.fullmatch(value):
        return None
    return f"{field}: {_shown(value)} is not 1-64 of [A-Za-z0-9._-] starting with a letter or digit"


def check_episode_id(value: object, field: str = "episode_id") -> str:
    """`value` when it is an episode id; raises InvalidIdError naming `field` otherwise."""
    problem = episode_id_problem(value, field)
    if problem:
        raise InvalidIdError(problem)
    return value  # type: ignore[return-value]


def check_name(value: object, field: str) -> str:
    """`value` when it is a safe name; raises InvalidIdError naming `field` otherwise."""
    problem = name_problem(value, field)
    if problem:
        raise InvalidIdError(problem)
    return value  # type: ignore[return-value]


def episode_key(episode_id: str) -> int:
    """A 63-bit integer for an episode id, so replay items can name their episode; raises
    InvalidIdError for anything but an episode id."""
    return int(check_episode_id(episode_id)[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF


def safe_file_stem(episode_id: object) -> str:
    """A file name stem for an episode whatever its id: the id itself when valid, else
    `invalid-<sha256 of its text>`, so a hostile id never reaches a path."""
    if episode_id_problem(episode_id) is None:
        return episode_id  # type: ignore[return-value]
    return "invalid-" + hashlib.sha256(repr(episode_id).encode()).hexdigest()[:32]


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
