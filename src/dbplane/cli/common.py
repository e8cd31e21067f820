"""What every group of CLI commands shares: the output option, the global options
(data root, API URL) and the API client built from them."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from ..paths import data_root
from .client import ApiClient


class Output(StrEnum):
    table = "table"
    json = "json"


OutputOpt = typer.Option(Output.table, "--output", "-o", help="table or json")


class _State:
    data_dir: str | None = None
    api: str | None = None
    profile: str | None = None


state = _State()


def client() -> ApiClient:
    return ApiClient.from_environment(state.data_dir, state.api, state.profile)


def root() -> Path:
    return data_root(state.data_dir)
