"""The one error type of the metrics package."""


class ScoringError(ValueError):
    """Bad input to scoring; the message is one line naming the problem."""
