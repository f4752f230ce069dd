"""Where star_dist keeps what it can make again: `$STAR_DIST_CACHE`, else
`$XDG_CACHE_HOME/star_dist`, else `~/.cache/star_dist`. Each user of it has its own folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The star_dist cache folder (not created here)."""
    root = os.environ.get("STAR_DIST_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "star_dist")
    return Path(root)
