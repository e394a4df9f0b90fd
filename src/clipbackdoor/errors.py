"""The one error type users see: what is wrong (naming the culprit) and how to fix it."""


class UserError(Exception):
    """A problem with the user's inputs or environment, reported without a traceback by the CLI."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" -- fix: {fix}" if fix else ""))

    def report(self, prog: str) -> str:
        """What the user sees (stderr): the culprit on one line, the fix on the next -- whatever text the
        problem carried (an exception's multi-line message is folded into its line)."""
        text = f"{prog}: error: {' '.join(self.problem.split())}"
        return text + (f"\n  fix: {' '.join(self.fix.split())}" if self.fix else "")


# Exit status of every refused input (CLI stages, `validate`, and Snakemake at workflow load).
EXIT_USER_ERROR = 2
