"""The `dbplane` command: a thin client of the REST API, plus the component runners."""
