"""The REST API: validates requests, writes desired state and operations, reads status."""
