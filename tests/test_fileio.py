"""The path layer: local and URI paths alike, whole-file writes, staging, the workdir lock."""

import os

import pytest

from entropy_rl import fileio
from entropy_rl.errors import ConfigError


def test_resolve_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert fileio.resolve("runs/x") == str(tmp_path / "runs" / "x")
  assert fileio.resolve("gs://b/runs/x") == "gs://b/runs/x"
  assert fileio.join("gs://b/r", "a", "b.txt") == "gs://b/r/a/b.txt"


@pytest.mark.parametrize("root", ["local", "memory://bucket/t1"])
def test_write_read_exists(tmp_path, root):
  root = str(tmp_path) if root == "local" else root
  path = fileio.join(root, "sub", "f.txt")
  assert not fileio.exists(path)
  fileio.write_text(path, "one")
  fileio.write_text(path, "two")  # replaced whole
  assert fileio.exists(path) and fileio.read_text(path) == "two"
  with pytest.raises(FileNotFoundError):
    fileio.read_bytes(fileio.join(root, "missing"))


def test_local_write_leaves_no_temporary_on_failure(tmp_path, monkeypatch):
  path = tmp_path / "f.bin"
  fileio.write_bytes(path, b"old")
  monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError, match="disk full"):
    fileio.write_bytes(path, b"new")
  assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_staged_uri_directory_round_trip():
  uri = "memory://bucket/staged"
  with fileio.Staged(uri) as s:
    assert s.remote and os.path.isdir(s.local)
    os.makedirs(os.path.join(s.local, "a"))
    with open(os.path.join(s.local, "a", "x.json"), "w") as f:
      f.write("{}")
    s.commit()
  assert fileio.read_text(uri + "/a/x.json") == "{}"
  with fileio.Staged(uri) as s:  # filled from the URI on entry
    assert open(os.path.join(s.local, "a", "x.json")).read() == "{}"


def test_workdir_lock_refuses_a_second_holder(tmp_path):
  with fileio.WorkdirLock(tmp_path):
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
      with fileio.WorkdirLock(tmp_path):
        pass
  with fileio.WorkdirLock(tmp_path):  # released
    pass
