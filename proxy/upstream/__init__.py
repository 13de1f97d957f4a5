"""pinproxy's one HTTP/1.1 client to backends: connection (http1.py), its pure decisions
(state.py), request framing, the keep-alive pool, TLS contexts; ``Upstream`` (client.py)."""
