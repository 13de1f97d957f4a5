"""The data port: one request's handling, from the client's bytes to the relayed answer."""
