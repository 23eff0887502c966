"""The archive's pinned schema: additive changes are accepted, type changes refused."""

import json

import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from replay.archive import MANIFEST_NAME, SCHEMA, ArchiveSchemaError, EpisodeArchive, \
    episode_table
from tests.fakes import PIXEL_SPEC, make_episode


def _manifest(root) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def test_a_new_archive_pins_the_schema(tmp_path):
    EpisodeArchive(tmp_path)
    assert _manifest(tmp_path)["columns"] == {f.name: str(f.type) for f in SCHEMA}


def test_an_older_archive_gains_added_columns_and_its_files_still_read(tmp_path):
    # A version-1 archive: no pixels column in its manifest or its files.
    old = make_episode(seed=1)
    table = episode_table(old).drop_columns(["pixels"])
    pq.write_table(table, tmp_path / f"{old.lineage.episode_id}.parquet")
    columns = {f.name: str(f.type) for f in SCHEMA if f.name != "pixels"}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "columns": columns}))

    archive = EpisodeArchive(tmp_path)
    assert _manifest(tmp_path)["columns"]["pixels"] == "binary"
    new = make_episode(seed=2, spec=PIXEL_SPEC)
    archive.write(new)
    back = {e.lineage.episode_id: e for e in archive.episodes()}
    assert back[old.lineage.episode_id].pixels is None
    assert back[new.lineage.episode_id].pixels.shape == new.pixels.shape
    assert archive.export(tmp_path / "export") == 2
    exported = pq.read_table(tmp_path / "export")
    assert exported.schema.field("pixels").type == SCHEMA.field("pixels").type
    assert exported.column("pixels").null_count == old.length + 1


@pytest.mark.parametrize("change,message", [
    ({"reward": "double"}, "column 'reward' is double in the archive, float here"),
    ({"gripper_force": "float"}, "column 'gripper_force' is in the archive but not in this"),
])
def test_a_changed_or_removed_column_is_refused_by_name(tmp_path, capsys, change, message):
    EpisodeArchive(tmp_path)
    manifest = _manifest(tmp_path)
    manifest["columns"].update(change)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArchiveSchemaError, match=message):
        EpisodeArchive(tmp_path)
    assert main(["archive", "ls", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
