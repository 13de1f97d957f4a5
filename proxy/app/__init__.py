"""The composition of the data application: builds every service once and closes them
in reverse order."""
