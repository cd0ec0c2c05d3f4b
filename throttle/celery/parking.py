"""A deferred task as the waiting room keeps it: its signature, serialized and compressed.

The parked message is what ``deferral.outgoing`` would have published: the
task's signature with its id, arguments, routing (queue, exchange, routing
key, priority), links, chain and throttle's headers.  It is serialized with
the task's own serializer (JSON by default; never a serializer the app does
not accept when it comes back) and compressed with zlib: a Celery message of
~1.5 kB parks in a few hundred bytes.

Layout: ``b"1|<content type>|<content encoding>|" + zlib(body)``.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

from kombu.serialization import dumps, loads, prepare_accept_content

if TYPE_CHECKING:
    from celery import Celery, Signature, Task

__all__ = ["pack", "unpack", "FORMAT"]

#: The layout's version, the first field of every parked message.
FORMAT = b"1"


def pack(task: Task, signature: Signature) -> bytes:
    """``signature`` as bytes to park."""
    serializer = task.serializer or task.app.conf.task_serializer
    content_type, encoding, body = dumps(dict(signature), serializer=serializer)  # type: ignore[no-untyped-call]
    raw = body if isinstance(body, bytes) else body.encode(encoding)
    return b"|".join((FORMAT, content_type.encode(), encoding.encode(), zlib.compress(raw, 6)))


def unpack(app: Celery, message: bytes) -> Signature:
    """The signature parked as ``message``; ``ValueError`` for anything else.

    Only content types the app accepts (``accept_content``) are decoded:
    whoever can write to Redis must not be able to make a worker unpickle.
    """
    try:
        version, content_type, encoding, body = message.split(b"|", 3)
    except ValueError:
        raise ValueError(f"not a parked message: {message[:40]!r}") from None
    if version != FORMAT:
        raise ValueError(f"parked message format {version!r}, this worker reads {FORMAT!r}")
    try:
        raw = zlib.decompress(body)
    except zlib.error as exc:
        raise ValueError(f"parked message body does not decompress: {exc}") from exc
    accept = prepare_accept_content(app.conf.accept_content)  # type: ignore[no-untyped-call]
    data: Any = loads(raw, content_type.decode(), encoding.decode(), accept=accept)  # type: ignore[no-untyped-call]
    if not isinstance(data, dict) or "task" not in data:
        raise ValueError(f"parked message is not a task signature: {str(data)[:80]!r}")
    return app.signature(data)
