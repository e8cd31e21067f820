"""`python -m dbplane.metrics [--update-docs FILE]`: print the metrics reference generated
from the catalogue, or rewrite it between the markers in FILE (docs/observability.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dbplane.metrics.catalog import reference_markdown, with_reference


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m dbplane.metrics",
                                 description="Print the metrics reference, or update it in a document.")
    ap.add_argument("--update-docs", metavar="FILE", help="rewrite the reference between the markers in FILE")
    args = ap.parse_args()
    if args.update_docs:
        path = Path(args.update_docs)
        path.write_text(with_reference(path.read_text()))
    else:
        print(reference_markdown())


if __name__ == "__main__":
    main()
