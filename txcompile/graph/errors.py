"""The two ways txcompile refuses: bad input (exit 2) and a model that fails verification (exit 1)."""


class TxError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""

    exit_code = 2


class VerificationError(TxError):
    """The final model does not match its reference within tolerance: exit code 1."""

    exit_code = 1


def one_line(err: BaseException) -> str:
    """An error as one line for stderr or a report: its first line, or its type when it has none."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
