"""A real S3-compatible server for tests: moto's server as a subprocess on 127.0.0.1.

The product's boto3 client talks HTTP to it; nothing is patched in-process.

    with s3_server(tmp_dir) as s3:          # or a fixture, see below
        repo = S3Repository("r", s3.endpoint, s3.bucket, "p", credentials_file=s3.credentials_file)

    @pytest.fixture(scope="module")
    def s3(tmp_path_factory):
        yield from s3_server_fixture(tmp_path_factory)
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

ACCESS_KEY = "dbplanetestkey"
SECRET_KEY = "dbplane-test-secret-do-not-show"


class S3Server(NamedTuple):
    endpoint: str
    bucket: str
    credentials_file: Path
    directory: Path

    def client(self):
        """A boto3 client for the test's own checks and setup (not the product's)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_credentials(path: Path, key: str = ACCESS_KEY, secret: str = SECRET_KEY,
                      mode: int = 0o600) -> Path:
    path.write_text(f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    path.chmod(mode)
    return path


def _wait_until_up(endpoint: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return
        except urllib.error.HTTPError:
            return                              # it answers: good enough
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer at {endpoint} within {timeout}s")


@contextlib.contextmanager
def s3_server(directory: Path | None = None, bucket: str = "dbplane-test") -> Iterator[S3Server]:
    """Start moto's S3 server, create `bucket` and a 0600 credentials file; stop it after."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dbplane-s3-")))
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log = directory / "moto.log"
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                     "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        try:
            _wait_until_up(endpoint, proc, log)
            server = S3Server(endpoint, bucket, write_credentials(directory / "s3-credentials"),
                              directory)
            server.make_bucket(bucket)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def s3_server_fixture(tmp_path_factory) -> Iterator[S3Server]:
    """Body of a pytest fixture: `yield from s3_server_fixture(tmp_path_factory)`."""
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server
