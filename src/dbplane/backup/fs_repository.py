"""The filesystem backup repository: objects are files under an existing directory,
published by writing a temporary file, fsync and rename (see `repository` for the interface).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import secrets
import stat as stat_mod
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dbplane.errors import DbplaneError, InvalidInput

from .repository import (
    BUFFER,
    CHECK_PREFIX,
    TEMP_RE,
    ObjectInfo,
    ObjectMissing,
    Repository,
    RepositoryFull,
    RepositoryUnavailable,
    check_key,
    check_prefix,
)

log = logging.getLogger("dbplane.backup")

DIR_MODE = 0o750
FILE_MODE = 0o640


class FilesystemRepository(Repository):
    """A directory (it must exist): objects are files, written to a temporary file in the
    same directory, fsync'd, renamed over the final name, and the directory fsync'd."""

    def __init__(self, name: str, path: str | Path, *, stale_temp_age: float = 3600.0):
        self.name = name
        self.root = Path(path)
        if not self.root.is_absolute():
            raise InvalidInput(f"repository {name}: path {str(path)!r} is not absolute",
                               "give the repository an absolute directory path")
        self.stale_temp_age = stale_temp_age

    def describe(self) -> str:
        return f"{self.root} (filesystem)"

    # -- errors

    def _unavailable(self, what: str, hint: str = "") -> RepositoryUnavailable:
        return RepositoryUnavailable(
            f"repository {self.name}: {what}",
            hint or f"create {self.root} (mode 0750, owned by the service account) or fix the "
            "repository path")

    def _require_root(self) -> None:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            raise self._unavailable(f"directory {self.root} does not exist") from None
        except OSError as e:
            raise self._translate(e, f"checking {self.root}") from e
        if not stat_mod.S_ISDIR(st.st_mode):
            raise self._unavailable(f"{self.root} is not a directory")

    def _translate(self, e: OSError, doing: str) -> DbplaneError:
        where = f"repository {self.name} ({self.root}): {doing} failed: {e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return RepositoryFull(where, f"free space under {self.root} or use another repository")
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return RepositoryUnavailable(
                where, f"make {self.root} writable by the service account (and mounted read-write)")
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and not self.root.is_dir():
            return self._unavailable(f"directory {self.root} does not exist")
        return RepositoryUnavailable(where, f"check the filesystem holding {self.root}")

    @contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise self._translate(e, doing) from e

    # -- paths

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _make_dirs(self, directory: Path) -> None:
        missing = []
        d = directory
        while not d.is_dir():
            if d == self.root:
                raise self._unavailable(f"directory {self.root} does not exist")
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, DIR_MODE)
            except FileExistsError:
                continue
            _fsync_dir(d.parent)

    # -- interface

    def put(self, key: str, chunks: Iterable[bytes]) -> int:
        dest = self._path(key)
        self._require_root()
        tmp = dest.with_name(f".{dest.name}.tmp-{secrets.token_hex(6)}")
        fd = self._create(key, tmp)
        f = open(fd, "wb", buffering=BUFFER)
        size = 0
        try:
            for chunk in chunks:                # the source's own errors propagate as they are
                with self._io(f"writing {key}"):
                    f.write(chunk)
                size += len(chunk)
            with self._io(f"writing {key}"):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            with self._io(f"publishing {key}"):
                os.rename(tmp, dest)
                _fsync_dir(dest.parent)
        except BaseException:
            self._discard(f, tmp)
            raise
        return size

    def _create(self, key: str, tmp: Path) -> int:
        """Open a new temporary file, making its directories (again, if a concurrent
        delete_prefix removed them in between)."""
        for attempt in (1, 2):
            with self._io(f"creating the directory for {key}"):
                self._make_dirs(tmp.parent)
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            except FileNotFoundError as e:
                if attempt == 2:
                    raise self._translate(e, f"creating {key}") from e
            except OSError as e:
                raise self._translate(e, f"creating {key}") from e
        raise AssertionError("unreachable")

    def _discard(self, f: io.BufferedWriter, tmp: Path) -> None:
        try:
            f.close()                           # may fail to flush (e.g. disk full): never mind
        except OSError:
            pass
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("repository %s: could not remove %s: %s", self.name, tmp, e)

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb", buffering=BUFFER)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._require_root()
            raise self._missing(key) from None
        except OSError as e:
            raise self._translate(e, f"reading {key}") from e

    def _missing(self, key: str) -> ObjectMissing:
        return ObjectMissing(f"{key} is missing from repository {self.name} ({self.root})",
                             "the object was deleted or never written; use another backup")

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._require_root()
            return None
        except OSError as e:
            raise self._translate(e, f"checking {key}") from e
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        self._require_root()
        base = prefix.rpartition("/")[0]
        out: list[ObjectInfo] = []
        with self._io(f"listing {prefix or '/'}"):
            for key, st in self._walk(self.root.joinpath(*base.split("/")) if base else self.root,
                                      base):
                if key.startswith(prefix) and (prefix.startswith(CHECK_PREFIX)
                                               or not key.startswith(CHECK_PREFIX)):
                    out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        out.sort(key=lambda o: o.key)
        return out

    def _walk(self, directory: Path, rel: str, temps: list[Path] | None = None
              ) -> Iterator[tuple[str, os.stat_result]]:
        try:
            it = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        with it:
            entries = list(it)
        for e in entries:
            key = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    yield from self._walk(Path(e.path), key, temps)
                elif TEMP_RE.match(e.name):
                    if temps is not None:
                        temps.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    yield key, e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue                        # removed while we looked

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except IsADirectoryError:
            return
        except OSError as e:
            raise self._translate(e, f"deleting {key}") from e

    def delete_prefix(self, prefix: str) -> int:
        n = super().delete_prefix(check_prefix(prefix))
        base = prefix.rstrip("/") if prefix.endswith("/") else prefix.rpartition("/")[0]
        if base:
            self._remove_empty_dirs(self.root.joinpath(*base.split("/")))
        return n

    def _remove_empty_dirs(self, directory: Path) -> None:
        if not directory.is_dir():
            return
        for sub in list(directory.iterdir()):
            if sub.is_dir() and not sub.is_symlink():
                self._remove_empty_dirs(sub)
        try:
            directory.rmdir()
        except OSError:
            pass                                # not empty: other objects or a write in progress

    def check(self) -> None:
        self._require_root()
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise self._unavailable(f"{self.root} is not writable",
                                    f"make {self.root} writable by the service account")
        self._clean_stale_temps()
        self._probe()
        try:
            (self.root / CHECK_PREFIX.rstrip("/")).rmdir()
        except OSError:
            pass

    def _clean_stale_temps(self) -> None:
        """Remove temporary files left by a crash (old enough that no write is still going)."""
        temps: list[Path] = []
        with self._io("looking for leftover temporary files"):
            for _ in self._walk(self.root, "", temps):
                pass
        cutoff = time.time() - self.stale_temp_age
        for t in temps:
            try:
                if t.stat().st_mtime < cutoff:
                    t.unlink()
                    log.info("repository %s: removed leftover temporary file %s", self.name, t)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise self._translate(e, f"removing leftover {t}") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
