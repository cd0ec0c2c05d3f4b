"""The original module name: ``from redis_token_bucket import RedisTokenBucket``."""

from throttle.bucket import RedisTokenBucket

__all__ = ["RedisTokenBucket"]
