"""``python -m worker [celery worker options]``: start a reference worker.

Without options: prefork pool, the queue from WORKER_QUEUE, log level info.
"""

from __future__ import annotations

import sys

from .app import app


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith(("-Q", "--queues")) for a in args):
        args += ["-Q", str(app.conf.task_default_queue)]
    if not any(a.startswith(("-l", "--loglevel")) for a in args):
        args += ["-l", "info"]
    app.worker_main(["worker", *args])


if __name__ == "__main__":
    main()
