"""The one exception the api layer raises: every problem found, one line each (file, resource, field).

A line reads
``vs.yaml: VirtualService default/reviews: spec.http[0].route[1].weight: must be between 0 and 100``
so a user can go straight to the offending field; the CLI prints the lines as they are and the control plane
returns them as the ``errors`` list of a 422.
"""

from __future__ import annotations

from collections.abc import Iterable


class ValidationError(Exception):
    """Resources (or the files holding them) are invalid; ``errors`` holds one line per problem."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)
