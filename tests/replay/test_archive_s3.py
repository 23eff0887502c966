"""The episode archive on an object store, for real: moto's S3 server on loopback, reached
through pyarrow's S3FileSystem with the endpoint and credentials taken from the environment
(AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...), as docs/operations.md tells operators to do."""

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from cluster.cli import main
from cluster.offline import select_episodes
from replay.archive import MANIFEST_NAME, SCHEMA, ArchiveSchemaError, EpisodeArchive, \
    episodes_from_blocks
from tests.fakes import PIXEL_SPEC, make_episode

@pytest.fixture
def s3(s3_prefix):
    """(archive URI under a fresh prefix, a filesystem for looking at the bucket directly)."""
    prefix, fs = s3_prefix
    return f"{prefix}/archive", fs


def _objects(fs: pafs.FileSystem, uri: str) -> list[str]:
    root = uri.removeprefix("s3://")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)


def _assert_same(back, episode):
    assert back.lineage == episode.lineage
    for name in ("observation", "action", "reward", "discount", "policy_version", "pixels"):
        np.testing.assert_array_equal(getattr(back, name), getattr(episode, name))
    assert (back.terminated, back.truncated, back.task_id) == \
        (episode.terminated, episode.truncated, episode.task_id)


def test_write_rewrite_and_read_back(s3):
    uri, fs = s3
    archive = EpisodeArchive(uri)
    assert isinstance(archive.filesystem, pafs.S3FileSystem)
    plain, camera = make_episode(length=6, seed=1, terminated=True), \
        make_episode(length=4, seed=2, spec=PIXEL_SPEC)
    assert archive.write(plain) and archive.write(camera)
    assert archive.write(plain) is False  # same episode_id again: a no-op, not a duplicate
    assert EpisodeArchive(uri).write(camera) is False  # also from another writer
    ids = sorted(e.lineage.episode_id for e in (plain, camera))
    assert _objects(fs, uri) == sorted([MANIFEST_NAME] + [f"{i}.parquet" for i in ids])  # no tmp
    back = {e.lineage.episode_id: e for e in EpisodeArchive(uri).episodes()}
    assert sorted(back) == ids
    _assert_same(back[plain.lineage.episode_id], plain)
    _assert_same(back[camera.lineage.episode_id], camera)


def test_endpoint_in_the_uri_instead_of_the_environment(s3, endpoint, monkeypatch):
    uri, _ = s3
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    episode = make_episode(seed=3)
    EpisodeArchive(f"{uri}?endpoint_override={endpoint}&scheme=http").write(episode)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{endpoint}")
    (back,) = EpisodeArchive(uri).episodes()
    _assert_same(back, episode)


def test_schema_is_pinned_in_the_bucket(s3):
    uri, fs = s3
    EpisodeArchive(uri)
    path = f"{uri.removeprefix('s3://')}/{MANIFEST_NAME}"
    read = lambda: json.loads(fs.open_input_stream(path).read())  # noqa: E731

    def put(manifest: dict) -> None:
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(manifest).encode())

    pinned = read()
    assert pinned["columns"] == {f.name: str(f.type) for f in SCHEMA}
    put({"schema_version": 1, "columns": {k: v for k, v in pinned["columns"].items()
                                          if k != "pixels"}})
    EpisodeArchive(uri)  # an older archive gains the added column
    assert read()["columns"] == pinned["columns"]
    put({**pinned, "columns": {**pinned["columns"], "reward": "double"}})
    with pytest.raises(ArchiveSchemaError, match="column 'reward' is double in the archive"):
        EpisodeArchive(uri)


def test_offline_training_reads(s3):
    """What `pacflow train-offline` reads: the metadata table for selection, whole episodes by
    path, and (with --stream) the step rows through the archive's filesystem in another
    process, which gets it pickled."""
    uri, _ = s3
    archive = EpisodeArchive(uri)
    episodes = [make_episode(length=3 + i, seed=i, cycle=i, version=i) for i in range(3)]
    episodes.append(make_episode(seed=9, cycle=2, mode="eval"))
    for episode in episodes:
        archive.write(episode)
    table = archive.episode_table()
    assert table.num_rows == 4
    assert sorted(table.column("length").to_pylist()) == [3, 4, 4, 5]

    selection = select_episodes(archive, "cycle >= 1")
    wanted = sorted(e.lineage.episode_id for e in episodes[1:3])
    assert selection.episode_ids == wanted  # eval episodes are never selected
    by_id = {e.lineage.episode_id: e for e in episodes}
    for episode_id in selection.episode_ids:
        _assert_same(archive.read(archive.path_of(episode_id)), by_id[episode_id])

    fs = pickle.loads(pickle.dumps(archive.filesystem))  # as Ray Data ships it to its workers
    paths = [archive.path_of(i) for i in selection.episode_ids]
    blocks = ds.dataset(paths, filesystem=fs, format="parquet").to_batches(batch_size=2)
    streamed = list(episodes_from_blocks(pa.Table.from_batches([b]) for b in blocks))
    assert [e.lineage.episode_id for e in streamed] == wanted
    for episode in streamed:
        _assert_same(episode, by_id[episode.lineage.episode_id])


def test_cli_stats_verify_export(s3, capsys):
    uri, fs = s3
    archive = EpisodeArchive(uri)
    good, bad = make_episode(length=3, seed=1), make_episode(length=5, seed=2)
    archive.write(good)
    archive.write(bad)
    assert main(["archive", "stats", uri]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "2 episodes, 8 transitions"

    export = f"{uri.rsplit('/', 1)[0]}/export"
    assert main(["archive", "export", uri, export]) == 0
    exported = ds.dataset(export.removeprefix("s3://"), filesystem=fs).to_table()
    assert exported.num_rows == 4 + 6 and exported.schema.names == SCHEMA.names

    assert main(["archive", "verify", uri]) == 0
    path = archive.path_of(bad.lineage.episode_id)
    data = fs.open_input_stream(path).read()
    with fs.open_output_stream(path) as f:  # an object cut short by a broken upload tool
        f.write(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["archive", "verify", uri]) == 1
    out = capsys.readouterr().out
    assert "1 episodes readable" in out and f"unreadable: {path}" in out
