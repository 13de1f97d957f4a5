"""Pure decisions that read settings: routing, a request's lifecycle, session extraction,
pin tokens. Events in, commands out; no I/O."""
