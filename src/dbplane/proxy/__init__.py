"""The connection proxy: stable writer/reader endpoints per database, transaction and
session pooling, failover without errors for idle clients. See docs/proxy.md."""
