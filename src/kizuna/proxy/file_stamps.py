"""When certificate files on disk change: (mtime, size) stamps that TLS contexts are cached by, so a rotated
file (a Secret mounted again, ``kizuna``'s CA writing new certificates) is read again on next use."""

from __future__ import annotations

import os
from collections.abc import Iterable

Stamp = tuple[int, int] | None
"""(mtime in ns, size) of a file; None for no path or a file that cannot be read."""


def file_stamps(paths: Iterable[str | os.PathLike[str] | None]) -> tuple[Stamp, ...]:
    """The stamp of each of ``paths``, in order."""
    stamps: list[Stamp] = []
    for path in paths:
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        stamps.append((st.st_mtime_ns, st.st_size) if st is not None else None)
    return tuple(stamps)
