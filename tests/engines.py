"""One interface over the three engines so one test suite checks them all.

The sync script engine, the sync transaction engine and the asyncio engine
must make the same decisions; tests take the ``engine`` fixture and run once
per engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import redis
import redis.asyncio

from throttle import AsyncMultiBucket, AsyncTokenBucket, Decision, MultiBucket, TokenBucket
from throttle.keys import bucket_key

ENGINES = ("script", "transaction", "async")


class Bucket(Protocol):
    def consume(self, cost: int = 1) -> Decision: ...
    def peek(self, cost: int = 1) -> Decision: ...
    def book(self, cost: int = 1, max_wait: float = 60.0) -> Decision: ...
    def reserve(self, cost: int = 1, max_wait: float = 60.0) -> float: ...
    def pause(self, seconds: float) -> Decision: ...
    def reset(self) -> None: ...
    def server_time(self) -> float: ...


class _AsyncAdapter:
    """Runs an async bucket's coroutines to completion on a private loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, bucket: Any) -> None:
        self._loop = loop
        self._bucket = bucket

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._bucket, name)
        if not callable(method):  # key, limit, keys: plain attributes
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._loop.run_until_complete(method(*args, **kwargs))

        return call


class Engine:
    """Builds buckets of one engine against one Redis URL."""

    def __init__(self, name: str, url: str, prefix: str, decode_responses: bool = False) -> None:
        self.name = name
        self.prefix = prefix
        self._loop: asyncio.AbstractEventLoop | None = None
        self.sync_client = redis.Redis.from_url(url, decode_responses=decode_responses)
        self._async_client: redis.asyncio.Redis | None = None
        if name == "async":
            self._loop = asyncio.new_event_loop()
            self._async_client = redis.asyncio.Redis.from_url(url, decode_responses=decode_responses)

    def bucket(self, key: str | bytes, rate: Any, burst: int) -> Bucket:
        if self._loop is not None and self._async_client is not None:
            ab = AsyncTokenBucket(self._async_client, key, rate=rate, burst=burst, prefix=self.prefix)
            return _AsyncAdapter(self._loop, ab)
        strategy: Literal["script", "transaction"] = "transaction" if self.name == "transaction" else "script"
        return TokenBucket(self.sync_client, key, rate=rate, burst=burst, prefix=self.prefix, strategy=strategy)

    def key(self, name: str | bytes) -> str | bytes:
        """The Redis key of the bucket called ``name``."""
        return bucket_key(self.prefix, name)

    def multi(self, buckets: Sequence[Bucket]) -> Bucket:
        if self._loop is not None:
            inner = [b._bucket for b in buckets]  # type: ignore[attr-defined]
            return _AsyncAdapter(self._loop, AsyncMultiBucket(inner))
        return MultiBucket(buckets)  # type: ignore[arg-type]

    def close(self) -> None:
        self.sync_client.close()
        if self._loop is not None and self._async_client is not None:
            self._loop.run_until_complete(self._async_client.aclose())
            self._loop.close()
