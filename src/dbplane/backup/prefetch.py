"""WAL prefetcher of a restore. PostgreSQL's restore_command (a tiny shell script, no
Python start per segment) asks for a file by creating `want.<name>.<pid>` in a spool
directory (one file per request: recovery may ask for the same file again at once). This
daemon answers with the decrypted file, with `<name>.none` when the repository has no such
file, or with `<name>.error` (the script then stops recovery: a corrupt or unreadable
segment must never end a restore early as if the WAL ended there). It reads ahead: the
segments after the last one asked for are fetched in parallel before recovery asks. It
exits when recovery has asked for nothing for a while.

  python -m dbplane.backup.prefetch PLAN.json
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel

from ..models import KmsKey, RepositorySpec
from ..security.kms import Kms, load_root_key
from ..store import Store, keys
from ..store.tls import EtcdTLS
from .objects import decode
from .repository import ObjectMissing, Repository, open_repository
from .wal import SEGMENT_RE, parse_segment_name, segment_name

log = logging.getLogger("dbplane.backup.prefetch")

SEG_SIZE = 16 * 1024 * 1024
READ_AHEAD = 6               # segments fetched before recovery asks for them
WORKERS = 4
IDLE_EXIT = 120.0            # s without a request after which the restore is over
REFRESH = 2.0                # s between listings of the sources when a file is missing

SCRIPT = """#!/bin/sh
# restore_command of a database being restored by dbplane: hands recovery the WAL file the
# prefetcher fetched (exit 0), says there is none (exit 1), or stops recovery (exit 255).
spool='@SPOOL@'
f="$1"; p="$2"; want="$spool/want.$f.$$"
: > "$want"
n=0
while [ $n -lt 12000 ]; do
  if [ -f "$spool/$f" ]; then mv -f "$spool/$f" "$p" && rm -f "$want"; exit $?; fi
  if [ -f "$spool/$f.none" ]; then rm -f "$want" "$spool/$f.none"; exit 1; fi
  if [ -f "$spool/$f.error" ]; then cat "$spool/$f.error" >&2; exit 255; fi
  sleep 0.05; n=$((n+1))
done
echo "dbplane: the WAL file $f was not fetched within 600 s (see prefetch.log)" >&2
exit 255
"""


class Plan(BaseModel):
    etcd: str
    etcd_tls: EtcdTLS | None = None       # the client certificate for an https etcd
    database: str
    repository: RepositorySpec
    kms_root_file: str
    sources: list[str]            # key prefixes, searched in order
    spool: str


class Prefetcher:
    def __init__(self, plan: Plan, repo: Repository, kms: Kms):
        self.plan, self.repo, self.kms = plan, repo, kms
        self.spool = Path(plan.spool)
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="prefetch")
        self.index: dict[str, str] = {}       # file name -> object key
        self.listed_at = 0.0
        self.fetches: dict[str, Future] = {}  # file name -> fetch in progress or done
        self.answered: set[str] = set()       # request files answered (the script removes them)

    def refresh(self) -> None:
        index: dict[str, str] = {}
        for prefix in reversed(self.plan.sources):    # earlier sources win
            for obj in self.repo.list(prefix):
                index[obj.key.rsplit("/", 1)[1]] = obj.key
        self.index, self.listed_at = index, time.monotonic()

    def lookup(self, name: str) -> str | None:
        """The object holding a file; a segment still being filled in the archive (only a
        .partial listed) may be complete by now, so it is looked up again then too."""
        key = self.index.get(name)
        if key is None and time.monotonic() - self.listed_at > REFRESH:
            self.refresh()
            key = self.index.get(name)
        return key or self.index.get(name + ".partial")

    def fetch(self, name: str, key: str) -> None:
        """Decrypt one file into the spool (write, then rename: the script never sees a
        half-written file). A partial segment is padded with zeros to a whole one. A
        .partial the archiver replaced by the whole segment since the listing is looked up
        again."""
        try:
            self._fetch(name, key)
        except ObjectMissing:
            self.refresh()
            newer = self.lookup(name)
            if newer is None:
                raise
            self._fetch(name, newer)

    def _fetch(self, name: str, key: str) -> None:
        tmp = self.spool / f".{name}.{os.getpid()}.tmp"
        size = 0
        with open(tmp, "wb") as f:
            for chunk in decode(self.repo.open(key), self.kms.decrypt_data_key):
                f.write(chunk)
                size += len(chunk)
            if key.endswith(".partial") and size < SEG_SIZE:
                f.truncate(SEG_SIZE)
        os.rename(tmp, self.spool / name)

    def start(self, name: str) -> Future | None:
        done = self.fetches.get(name)
        if done is not None and done.done() and done.exception() is None \
                and not (self.spool / name).exists():
            del self.fetches[name]                # handed over already: asked again, fetch again
        if name in self.fetches:
            return self.fetches[name]
        key = self.lookup(name)
        if key is None:
            return None
        self.fetches[name] = self.pool.submit(self.fetch, name, key)
        return self.fetches[name]

    def answer(self, name: str) -> bool:
        """Settle one request if its outcome is known; True when answered."""
        future = self.start(name)
        if future is None:
            gap = self.later_segment(name)
            if gap:
                message = (f"WAL segment {name} is missing from the archive, but {gap} comes after it: "
                           "the archive has a gap; restore to a time before it")
                (self.spool / f"{name}.error").write_text(f"dbplane: {message}\n")
                log.error("%s", message)
                self.report(message)
                return True
            (self.spool / f"{name}.none").touch()
            log.info("%s: not in the repository", name)
            return True
        if not future.done():
            return False
        error = future.exception()
        if error is not None:
            message = f"cannot fetch WAL file {name}: {error}"
            (self.spool / f"{name}.error").write_text(f"dbplane: {message}\n")
            log.error("%s", message)
            self.report(message)
            return True
        log.info("%s: fetched", name)
        if SEGMENT_RE.match(name):
            self.read_ahead(name)
        return True

    def later_segment(self, name: str) -> str:
        """A segment the archive holds after a missing one: then the missing one is a gap,
        not the end of the WAL (recovery asks for the segment after the last one)."""
        if not SEGMENT_RE.match(name):
            return ""
        tli, start = parse_segment_name(name, SEG_SIZE)
        for other in self.index:
            base = other.removesuffix(".partial")
            if SEGMENT_RE.match(base):
                other_tli, other_start = parse_segment_name(base, SEG_SIZE)
                if other_start > start and other_tli >= tli:
                    return other
        return ""

    def report(self, message: str) -> None:
        """Tell the controller why the restore fails (it rolls the database back)."""
        async def put() -> None:
            async with Store(self.plan.etcd, tls=self.plan.etcd_tls) as store:
                await store.put(keys.restore_failed(self.plan.database),
                                f"restore of {self.plan.database} failed: {message}")
        try:
            asyncio.run(put())
        except Exception:
            log.exception("could not report the failure")

    def read_ahead(self, name: str) -> None:
        tli, start = parse_segment_name(name, SEG_SIZE)
        for i in range(1, READ_AHEAD + 1):
            self.start(segment_name(tli, start + i * SEG_SIZE, SEG_SIZE))

    def run(self) -> None:
        self.refresh()
        log.info("serving WAL from %s (%d files) into %s", ", ".join(self.plan.sources),
                 len(self.index), self.spool)
        last_request = time.monotonic()
        while time.monotonic() - last_request < IDLE_EXIT:
            if not self.spool.is_dir():
                log.info("the spool is gone (the member was removed or restarted its restore)")
                return
            requests = {p.name for p in self.spool.glob("want.*")}
            for request in requests - self.answered:
                last_request = time.monotonic()
                if self.answer(request[5:].rsplit(".", 1)[0]):
                    self.answered.add(request)
            self.answered &= requests
            time.sleep(0.02)
        log.info("no WAL requested for %.0f s: the restore is over", IDLE_EXIT)
        self.pool.shutdown(cancel_futures=True)
        for leftover in self.spool.glob("*"):
            leftover.unlink(missing_ok=True)


async def load_keys(etcd: str, etcd_tls: EtcdTLS | None = None) -> list[KmsKey]:
    async with Store(etcd, tls=etcd_tls) as store:
        return await store.list(keys.kms_keys(), KmsKey)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s prefetch %(levelname)s %(message)s")
    plan = Plan.model_validate_json(Path(sys.argv[1]).read_text())
    kms = Kms(load_root_key(plan.kms_root_file), asyncio.run(load_keys(plan.etcd, plan.etcd_tls)))
    Prefetcher(plan, open_repository(plan.repository), kms).run()


if __name__ == "__main__":
    main()
