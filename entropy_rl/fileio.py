"""The one path layer for everything a run writes: local paths and URIs (gs://, memory://, ...).

Checkpoints go through orbax, which needs absolute paths; every other file (metrics, TensorBoard
events, tokenizer, warm start, plots, summary) goes through these helpers, which use fsspec for
URIs (gcsfs for gs://). Libraries that only read and write local directories (a tokenizer's
`save_pretrained`, safetensors) work on a local staging copy: `download_dir` and `upload_dir`.
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import socket
import tempfile
import time

from entropy_rl.errors import ConfigError


def is_uri(path) -> bool:
  return "://" in str(path)


def resolve(path) -> str:
  """An absolute local path (relative to the current directory) or the URI unchanged."""
  path = os.fspath(path)
  return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(path, *parts) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_uri(path) else os.path.join(path, *parts)


def _fs(path):
  import fsspec  # pylint: disable=g-import-not-at-top

  return fsspec.core.url_to_fs(str(path))


def exists(path) -> bool:
  if not is_uri(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return fs.exists(p)


def makedirs(path) -> None:
  """Creates a local directory (and file:// ones); object stores have none to create."""
  if not is_uri(path):
    os.makedirs(path, exist_ok=True)
    return
  fs, p = _fs(path)
  if "file" in fs.protocol:
    fs.makedirs(p, exist_ok=True)


def read_bytes(path) -> bytes:
  """The file's bytes; FileNotFoundError naming the path when absent."""
  if not is_uri(path):
    with open(path, "rb") as f:
      return f.read()
  fs, p = _fs(path)
  if not fs.exists(p):
    raise FileNotFoundError(path)
  return fs.cat_file(p)


def read_text(path) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path, data: bytes) -> None:
  """Writes whole: a local file through a temporary file and a rename (never half-written);
  an object store's put is atomic by itself."""
  if is_uri(path):
    fs, p = _fs(path)
    if "file" in fs.protocol:  # object stores have no directories to create
      fs.makedirs(posixpath.dirname(p), exist_ok=True)
    fs.pipe_file(p, data)
    return
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def upload_dir(local_dir, path) -> None:
  """Copies every file under `local_dir` to the directory `path` (local or URI)."""
  for root, _, files in os.walk(local_dir):
    for name in files:
      src = os.path.join(root, name)
      rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
      with open(src, "rb") as f:
        write_bytes(join(path, *rel.split("/")), f.read())


def download_dir(path, local_dir) -> bool:
  """Copies every file under the URI directory `path` into `local_dir`; False if it is absent."""
  fs, p = _fs(path)
  if not fs.exists(p):
    return False
  p = p.rstrip("/")
  for src in fs.find(p):
    rel = src[len(p) :].lstrip("/")
    dst = os.path.join(local_dir, *rel.split("/"))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as f:
      f.write(fs.cat_file(src))
  return True


class Staged:
  """A local directory standing for `path`: `path` itself when local; for a URI, a temporary
  directory filled from it on entry and, with `upload=True`, copied back by `commit()`."""

  def __init__(self, path):
    self.path = os.fspath(path)
    self.remote = is_uri(self.path)
    self._tmp = None
    if self.remote:
      self._tmp = tempfile.TemporaryDirectory(prefix="entropy_rl_stage_")
      self.local = self._tmp.name
      download_dir(self.path, self.local)
    else:
      self.local = self.path

  def commit(self) -> None:
    if self.remote:
      upload_dir(self.local, self.path)

  def close(self) -> None:
    if self._tmp is not None:
      self._tmp.cleanup()
      self._tmp = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class WorkdirLock:
  """An exclusive lock on a local workdir (`flock` on DIR/.lock, released when the process exits,
  however it exits), so a second run on the same workdir fails at once instead of writing every
  step twice. A URI workdir cannot be locked this way: there the caller must not start two runs."""

  FILE = ".lock"

  def __init__(self, workdir):
    self.workdir, self._fd = os.fspath(workdir), None

  def __enter__(self):
    if is_uri(self.workdir):
      return self
    path = os.path.join(self.workdir, self.FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      with open(path) as f:
        owner = f.read().strip() or "{}"
      os.close(fd)
      info = json.loads(owner)
      raise ConfigError(
          f"--workdir={self.workdir} is in use by another run (pid {info.get('pid')} on "
          f"{info.get('host')}, started {info.get('started')}): wait for it to finish, stop it, "
          "or choose another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.write(
        fd,
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        ).encode(),
    )
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      os.close(self._fd)  # closing releases the lock
      self._fd = None
