"""Logging to stderr, which systemd sends to the journal."""

from __future__ import annotations

import logging
import os


def configure(verbose: bool = False) -> None:
    # Under systemd (JOURNAL_STREAM set) the journal stamps time and unit itself.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt)
    logging.getLogger("websockets").setLevel(logging.WARNING)
