"""The ``pinproxy`` command and what it renders."""
