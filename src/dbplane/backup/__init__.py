"""Backups: repositories (filesystem, S3), the encrypted object format, WAL archive and base backups."""
