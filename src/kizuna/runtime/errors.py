"""The runtime's one exception: something the user can fix."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad input, nothing running...); the CLI prints ``kizuna: <message>``.

    ``lines`` holds one entry per problem (validation reports several); ``str()`` joins them.
    """

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines: tuple[str, ...] = lines
