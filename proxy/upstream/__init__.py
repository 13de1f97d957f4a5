"""The clients that speak HTTP/1.1 to backends: the lean httptools client and its pool,
aiohttp's client for streamed bodies, TLS contexts."""
