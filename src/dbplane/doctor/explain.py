"""Reading EXPLAIN (FORMAT JSON, VERBOSE) plans for sequential scans that a selective
predicate would rather answer from an index, and writing the CREATE INDEX that would (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass

SEQ_SCANS = ("Seq Scan", "Parallel Seq Scan")
# "(orders.customer_id = $1)", "((o.status)::text = 'new'::text)", "(created_at > $2)"
_COMPARISON = re.compile(
    r"\(*(?:(?P<alias>\w+|\"[^\"]+\")\.)?(?P<col>\w+|\"[^\"]+\")\)?(?:::[\w ]+(?:\[\])?\)?)?\s*"
    r"(?P<op>=|<>|!=|<=|>=|<|>|~~\*?|IS NULL|IS NOT NULL)\s*(?P<any>ANY)?")
_EQUALITY = {"=", "IS NULL"}
_IDENT = re.compile(r"^[a-z_][a-z0-9_$]*$")
# reserved words that cannot be bare identifiers (enough of them for table and column names)
_RESERVED = {"all", "and", "any", "array", "as", "asc", "case", "check", "column", "constraint",
             "create", "default", "desc", "distinct", "do", "else", "end", "for", "foreign", "from",
             "grant", "group", "having", "in", "into", "limit", "not", "null", "offset", "on", "only",
             "or", "order", "primary", "references", "select", "table", "then", "to", "union",
             "unique", "user", "using", "when", "where", "with"}


@dataclass
class Scan:
    """A sequential scan with a filter, from a plan."""
    schema: str
    table: str
    alias: str
    filter: str
    rows: float          # the planner's estimate of rows the filter keeps (all workers)


def seq_scans(plan: dict) -> list[Scan]:
    """Every filtered sequential scan in a plan (the "Plan" of EXPLAIN's JSON)."""
    out: list[Scan] = []

    def walk(node: dict, workers: int) -> None:
        if node.get("Node Type") in ("Gather", "Gather Merge"):
            workers = int(node.get("Workers Planned") or 0)
        if node.get("Node Type") in SEQ_SCANS and node.get("Filter"):
            rows = float(node.get("Plan Rows") or 0)
            if node.get("Parallel Aware"):
                rows *= workers + 1          # per process: the leader takes part too
            out.append(Scan(schema=node.get("Schema", "public"), table=node.get("Relation Name", ""),
                            alias=node.get("Alias", ""), filter=node["Filter"], rows=rows))
        for child in node.get("Plans") or []:
            walk(child, workers)

    walk(plan, 0)
    return out


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def filter_columns(filter_text: str, alias: str, columns: list[str]) -> list[str]:
    """The table's columns the filter compares with something, equality first (they lead
    a b-tree index best), then ranges; in the order they appear, without repeats."""
    eq, rng = [], []
    for m in _COMPARISON.finditer(filter_text):
        start = m.start("alias") if m["alias"] else m.start("col")
        if start >= 2 and filter_text[start - 1] == "(" and (filter_text[start - 2].isalnum()
                                                             or filter_text[start - 2] == "_"):
            continue                     # a function's argument: lower(email) needs an expression index
        qualifier = _unquote(m["alias"]) if m["alias"] else ""
        col = _unquote(m["col"])
        if qualifier and alias and qualifier != alias:
            continue
        if col not in columns:
            continue
        (eq if m["op"] in _EQUALITY else rng).append(col)
    seen: list[str] = []
    for c in eq + rng:
        if c not in seen:
            seen.append(c)
    return seen[:3]


def ident(name: str) -> str:
    if _IDENT.match(name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def create_index(schema: str, table: str, columns: list[str]) -> str:
    """CREATE INDEX CONCURRENTLY (no write lock while it builds) on the columns."""
    name = "_".join([table, *columns, "idx"])[:63]
    return (f"CREATE INDEX CONCURRENTLY {ident(name)} ON {ident(schema)}.{ident(table)} "
            f"({', '.join(ident(c) for c in columns)});")
