"""The storage layer's domain errors: callers map them to the error catalogue (server/errors.py)."""

from __future__ import annotations


class StorageError(Exception):
    """A request the data cannot satisfy (as opposed to a database failure)."""


class ClientIdTakenError(StorageError):
    """The client id already names another author's message, or another kind of message, in the conversation."""


class LimitReachedError(StorageError):
    """A write would take a row count past its configured limit: nothing was written."""


class NotFoundError(StorageError):
    """The row a write refers to does not exist for this tenant (and user): nothing was written."""


class DuplicateNameError(StorageError):
    """Another document of the course already has the name: nothing was written."""

    def __init__(self, message: str, document_id: int):
        super().__init__(message)
        self.document_id = document_id


class UserErasedError(StorageError):
    """The user was erased (`smartedu delete-user`) after the token naming them was issued: nothing was written."""


class AnswerFencedError(StorageError):
    """This replica no longer owns the answer (another replica took it over, or acknowledged and started it
    first): Redis refused its frame, and nothing was logged or published."""
