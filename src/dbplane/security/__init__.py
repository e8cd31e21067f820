"""Credentials and, later, TLS, keys and access control."""
