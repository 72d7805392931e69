"""Mapping what goes wrong inside one backend step onto the contract's errors.

Until a step has issued a change, a fault that says "nothing was done, try later" is a
TransientError (the engine retries the step); after that, or for any other fault, it is
StepFailed (the engine rolls back). Steps that are idempotent end to end (snapshot,
commit, release: each re-reads the state and continues from it) may let a TransientError
through even after a change (`retry_safe`); apply may not: its command is not re-run on a
vCenter hiccup. Messages are scrubbed of the password.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from patchd.backends.base import BackendError, StepFailed, TransientError
from patchd.backends.vsphere.collector import TaskFailed, TaskTimeout
from patchd.backends.vsphere.connection import Session, fault_text, is_transient


class Progress:
    """Set `changed` before the step's first change."""

    changed = False


@contextmanager
def step(session: Session, what: str, retry_safe: bool = False) -> Iterator[Progress]:
    progress = Progress()
    try:
        yield progress
    except TransientError as err:
        if progress.changed and not retry_safe:
            raise StepFailed(session.scrub(f"{what}: {err}")) from None
        raise
    except BackendError:
        raise
    except (TaskFailed, TaskTimeout) as err:
        raise StepFailed(session.scrub(f"{what}: {err}")) from None
    except Exception as err:
        text = session.scrub(fault_text(err))
        if (not progress.changed or retry_safe) and is_transient(err, mutating=progress.changed):
            raise TransientError(f"{what}: {text}") from None
        raise StepFailed(f"{what}: {text}") from None
