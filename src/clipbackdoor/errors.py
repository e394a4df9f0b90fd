"""The one error type users see: what is wrong (naming the culprit) and how to fix it."""


class UserError(Exception):
    """A problem with the user's inputs or environment, reported without a traceback by the CLI."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" -- fix: {fix}" if fix else ""))
