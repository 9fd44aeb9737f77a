"""The one project exception: every error names where it happened and how to fix it."""

from __future__ import annotations


class BitsmithError(Exception):
    """A user-facing error: `where` (file, pass, layer or node), the `problem`, and the `fix`."""

    def __init__(self, problem: str, *, fix: str | None = None, where: str | None = None):
        self.problem = problem
        self.fix = fix
        self.where = where
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        if self.fix:
            text += f" (fix: {self.fix})"
        return text
