"""The per-host agent: supervises Patroni + PostgreSQL for the members placed on its host."""
