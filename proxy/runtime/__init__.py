"""Processes, listeners, workers and signals: turns settings into running servers."""
