"""Instance classes: named sizes that map to PostgreSQL settings (like db.t3.micro ...)."""

from __future__ import annotations

from pydantic import BaseModel

from .errors import InvalidInput


class InstanceClass(BaseModel):
    name: str
    description: str
    memory_mb: int
    max_connections: int
    settings: dict[str, str]


def _cls(name: str, description: str, memory_mb: int, max_connections: int, work_mem: str
         ) -> InstanceClass:
    return InstanceClass(
        name=name, description=description, memory_mb=memory_mb, max_connections=max_connections,
        settings={
            "shared_buffers": f"{memory_mb // 4}MB",
            "effective_cache_size": f"{memory_mb * 3 // 4}MB",
            "maintenance_work_mem": f"{max(16, memory_mb // 16)}MB",
            "work_mem": work_mem,
            "max_connections": str(max_connections),
        })


CLASSES: dict[str, InstanceClass] = {c.name: c for c in [
    _cls("micro", "for tests and demos: 128 MB of buffers and cache", 128, 50, "2MB"),
    _cls("small", "light workloads: 512 MB", 512, 100, "4MB"),
    _cls("medium", "2 GB", 2048, 200, "8MB"),
    _cls("large", "8 GB", 8192, 400, "16MB"),
]}


def get_class(name: str) -> InstanceClass:
    try:
        return CLASSES[name]
    except KeyError:
        raise InvalidInput(f"unknown instance class {name!r}",
                           f"choose one of {', '.join(CLASSES)} (see 'dbplane classes')",
                           code="invalid_class") from None
