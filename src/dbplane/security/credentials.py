"""Credential profiles for API clients, in the format of ~/.aws/credentials:

    [default]
    access_key_id = DPAK...
    secret_access_key = ...

Where a client looks, first match wins:
  1. DBPLANE_ACCESS_KEY_ID and DBPLANE_SECRET_ACCESS_KEY in the environment;
  2. a profile named with --profile or DBPLANE_PROFILE: in the shared file
     (DBPLANE_SHARED_CREDENTIALS_FILE, default ~/.dbplane/credentials), then in the data
     root's `credentials` (written by `dbplane up` for user admin);
  3. profile `default` of the data root's file, then of the shared file.
Files are written 0600; a secret is never printed.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path
from typing import NamedTuple

from ..errors import InvalidInput
from ..paths import write_private

DEFAULT_PROFILE = "default"


class Credentials(NamedTuple):
    key_id: str
    secret: str
    source: str                      # where they came from, for error messages

    def __repr__(self) -> str:
        return f"Credentials(key_id={self.key_id!r}, source={self.source!r})"


def shared_file() -> Path:
    return Path(os.environ.get("DBPLANE_SHARED_CREDENTIALS_FILE") or Path.home() / ".dbplane" / "credentials")


def data_root_file(root: Path) -> Path:
    return root / "credentials"


def _read(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text())
    except (OSError, UnicodeDecodeError):
        pass
    except configparser.Error as e:
        raise InvalidInput(f"the credentials file {path} does not parse: {str(e).splitlines()[0]}",
                           "fix or remove it; it holds [profile] sections with access_key_id and "
                           "secret_access_key", code="bad_credentials_file") from None
    return parser


def read_profile(path: Path, profile: str) -> Credentials | None:
    parser = _read(path)
    if not parser.has_section(profile):
        return None
    section = parser[profile]
    key_id, secret = section.get("access_key_id", ""), section.get("secret_access_key", "")
    if not key_id or not secret:
        raise InvalidInput(f"profile {profile} in {path} lacks access_key_id or secret_access_key",
                           "recreate it with 'dbplane iam access-key create ... --profile "
                           f"{profile}'", code="bad_credentials_file")
    return Credentials(key_id, secret, f"profile {profile} in {path}")


def write_profile(path: Path, profile: str, key_id: str, secret: str) -> None:
    """Add or replace one profile, keeping the others; the file is 0600."""
    parser = _read(path)
    if not parser.has_section(profile):
        parser.add_section(profile)
    parser[profile]["access_key_id"] = key_id
    parser[profile]["secret_access_key"] = secret
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lines = []
    for name in parser.sections():
        lines.append(f"[{name}]")
        lines += [f"{k} = {v}" for k, v in parser[name].items()]
        lines.append("")
    write_private(path, "\n".join(lines))


def resolve(root: Path | None, profile: str | None = None) -> Credentials | None:
    env_id, env_secret = os.environ.get("DBPLANE_ACCESS_KEY_ID"), os.environ.get("DBPLANE_SECRET_ACCESS_KEY")
    if env_id and env_secret:
        return Credentials(env_id, env_secret, "the environment")
    profile = profile or os.environ.get("DBPLANE_PROFILE")
    files = [shared_file()] + ([data_root_file(root)] if root else [])
    if profile:
        for path in files:
            found = read_profile(path, profile)
            if found:
                return found
        raise InvalidInput(f"no profile {profile} in {' or '.join(str(f) for f in files)}",
                           "create it with 'dbplane iam access-key create --user U --profile "
                           f"{profile}', or name another with --profile", code="profile_not_found")
    for path in reversed(files):
        found = read_profile(path, DEFAULT_PROFILE)
        if found:
            return found
    return None
