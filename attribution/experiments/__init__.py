"""Experiments run from the command line: ``python -m attribution <command>``."""
