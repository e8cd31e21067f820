"""Serving the API over https with a certificate from the platform CA. uvicorn builds its
SSLContext once; a thread re-issues the certificate when it is due (security/tls.py) and
loads it into that same context, so new connections get it without a restart."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path

import uvicorn

from ..security import ca, tls

log = logging.getLogger("dbplane.api")

RENEW_CHECK_S = 3600.0
# On SIGTERM, requests in flight get this long to finish. Without a bound, each idle
# keep-alive TLS connection (a browser on the console, a Prometheus scraper) holds shutdown
# for asyncio's 30 s TLS close_notify timeout, and `dbplane down` waited that long.
GRACEFUL_SHUTDOWN_S = 5


def serve(app, host: str, port: int, cert: Path, key: Path, data_root: Path) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            ssl_certfile=str(cert), ssl_keyfile=str(key),
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    config.load()
    threading.Thread(target=_keep_renewed, args=(config.ssl, cert, key, data_root),
                     name="api-certificate", daemon=True).start()
    uvicorn.Server(config).run()


def _keep_renewed(context: ssl.SSLContext, cert: Path, key: Path, data_root: Path) -> None:
    while True:
        time.sleep(RENEW_CHECK_S)
        try:
            names = ca.names_of(ca.load_cert(cert)) if cert.exists() else []
            why = tls.ensure_leaf(data_root, cert, key, names, None)
            if why:
                context.load_cert_chain(cert, key)       # the next handshakes use it
                log.info("re-issued the API's TLS certificate (%s)", why)
        except (ca.CaMissing, OSError, ssl.SSLError) as e:
            log.warning("cannot renew the API's TLS certificate %s: %s", cert, e)
