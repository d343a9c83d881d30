"""User-facing errors: one line that names the file, line or field and the fix."""

from __future__ import annotations


class RaytrainError(Exception):
    """An error caused by the user's input or config; the CLI prints it without a traceback."""


class ConfigError(RaytrainError):
    """A config key, type or value that cannot be used."""


class DataError(RaytrainError):
    """An input file, record or output folder that cannot be used."""


def find_raytrain_error(exc: BaseException) -> RaytrainError | None:
    """The RaytrainError behind `exc`, also when Ray wrapped it in task/actor errors."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # Ray re-raises a remote error as a subclass of it whose message holds the remote
        # traceback; the original, with the plain message, sits in `.cause`.
        remote_cause = getattr(current, "cause", None)
        if isinstance(remote_cause, BaseException):
            stack.append(remote_cause)
            continue
        if isinstance(current, RaytrainError):
            return current
        stack += [current.__cause__, current.__context__]
    return None
