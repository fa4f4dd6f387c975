"""Storage behaves the same on a local dir and on S3 (moto server on 127.0.0.1),
and writes are atomic."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapgap import storage


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trip(root: str) -> None:
    uri = storage.join(root, "a", "b.json")
    assert not storage.exists(uri)
    storage.write_json(uri, {"x": [1, 2]})
    assert storage.exists(uri)
    assert storage.read_json(uri) == {"x": [1, 2]}
    storage.write_bytes(storage.join(root, "a", "c.bin"), b"\x00\x01")
    assert storage.read_bytes(storage.join(root, "a", "c.bin")) == b"\x00\x01"
    assert storage.glob(storage.join(root, "a", "*")) == [
        storage.join(root, "a", "b.json"),
        storage.join(root, "a", "c.bin"),
    ]
    with storage.local_file(uri) as local:
        assert Path(local).read_bytes() == storage.read_bytes(uri)


def test_interrupted_write_keeps_old_file(root: str) -> None:
    uri = storage.join(root, "report.json")
    storage.write_text(uri, "old")
    with pytest.raises(RuntimeError, match="boom"), storage.atomic_open(uri) as f:
        f.write(b"new but half")
        raise RuntimeError("boom")
    assert storage.read_text(uri) == "old"
    if not storage.is_remote(root):
        assert [p.name for p in Path(root).iterdir()] == ["report.json"]  # no temp left over


def test_interrupted_first_write_leaves_nothing(root: str) -> None:
    uri = storage.join(root, "new.bin")
    with pytest.raises(RuntimeError), storage.atomic_open(uri) as f:
        f.write(b"x" * 10)
        raise RuntimeError("killed")
    assert not storage.exists(uri)


def test_missing_file_names_uri(root: str) -> None:
    uri = storage.join(root, "nope.json")
    with pytest.raises(storage.StorageError, match="nope.json: no such file"):
        storage.read_json(uri)
    with pytest.raises(storage.StorageError, match="nope.json"), storage.local_file(uri):
        pass


def test_bad_json_names_uri(root: str) -> None:
    uri = storage.join(root, "bad.json")
    storage.write_text(uri, "{not json")
    with pytest.raises(storage.StorageError, match=r"bad.json: not valid JSON"):
        storage.read_json(uri)


def test_fingerprint_follows_content_not_writes(root: str) -> None:
    a, b = storage.join(root, "a.txt"), storage.join(root, "b.txt")
    storage.write_text(a, "one")
    first = storage.fingerprint([a, b])
    storage.write_text(a, "one")  # same bytes rewritten
    assert storage.fingerprint([b, a]) == first
    storage.write_text(a, "two")
    assert storage.fingerprint([a, b]) != first
    storage.write_text(b, "now present")
    assert storage.fingerprint([a, b]) != storage.fingerprint([a])


def test_sweep_removes_only_atomic_write_temporaries(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with storage.atomic_open(str(run_dir / "tiles" / "a.png")) as f:
        f.write(b"x")
        # What a kill -9 at this point would leave behind:
        (interrupted,) = [p for p in (run_dir / "tiles").iterdir()]
    left = run_dir / "tiles" / interrupted.name
    left.write_bytes(b"partial")
    others = [run_dir / "notes.tmp-0a1b2c3d", run_dir / ".x.tmp-notahex0",
              run_dir / "tiles" / "a.png", tmp_path / ".outside.tmp-0a1b2c3d"]
    for p in others[:2] + others[3:]:
        p.write_text("keep")
    assert storage.sweep_temporaries(str(run_dir)) == [str(left)]
    assert all(p.exists() for p in others) and not left.exists()
    assert storage.sweep_temporaries("s3://bucket/run") == []  # S3 writes leave none
