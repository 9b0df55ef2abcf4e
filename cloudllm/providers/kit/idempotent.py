"""Calls that must take effect once although their answer can be lost: creates and deletes.

A create whose answer was lost on the way back, retried, meets "already exists" (or, sent again,
makes a second one); a delete retried after its first attempt went through meets "not found".
The cloud's own words for those two cases are the provider's; the rule is here.
"""

from __future__ import annotations

from typing import Any, Callable


def create_once(
    send: Callable[[], Any],
    *,
    find: Callable[[], Any],
    exists: Callable[[Exception], bool] = lambda exc: False,
    retry: Callable[[Callable[[], Any]], Callable[[], Any]] = lambda attempt: attempt,
) -> Any:
    """send()'s answer, or find()'s when an earlier attempt already made what we ask for.

    Before sending again (retry calls the attempt more than once), find() looks for what an
    earlier attempt made. When the cloud answers that the thing exists (exists(exc)), find()
    says whether it is ours: its answer, or the original error when it is None.
    """
    tried = False

    def attempt():
        nonlocal tried
        if tried and (found := find()) is not None:
            return found
        tried = True
        try:
            return send()
        except Exception as exc:
            if not exists(exc):
                raise
            found = find()
            if found is None:
                raise
            return found

    return retry(attempt)()


def delete_unless_gone(delete: Callable[[], Any], *, gone: Callable[[Exception], bool]) -> Any | None:
    """delete()'s answer; None when the cloud says the thing is already gone (an earlier attempt removed it)."""
    try:
        return delete()
    except Exception as exc:
        if gone(exc):
            return None
        raise
