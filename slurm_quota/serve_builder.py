"""The builder process of `slurm-quota serve`: builds the whole-ledger answers.

/stats without a selector and /metrics describe every user and account: 4-6 MB at 10k users,
60-130 ms to build and 40-50 ms to compress. A server process is one thread running an event
loop, so building them there would hold up every other client of that process meanwhile.
Each server process therefore starts one of these (`python -m slurm_quota.serve_builder DB`)
and asks it through a pipe; its own clients are served while the builder works.

Protocol, one request at a time, in order:

- server → builder: a key and a newline (`stats` or `metrics`);
- builder → server: a JSON header line `{"key", "status", "type", "body", "gzip", "etag"}`
  (lengths in bytes, gzip -1 when there is no compressed copy, etag the body's entity tag or
  null), then the body and the compressed body.

The builder reads the ledger read-only through the same code as the routes (App.handle), so
its answers, errors included (503 when the ledger is missing or locked), are those a
server process would build itself. It ends when the server closes the pipe (EOF), also when
the server was killed; it ignores SIGINT, which a terminal sends to the whole process group:
the server stops it.
"""

from __future__ import annotations

import json
import logging
import signal
import sys

from slurm_quota import serve

log = logging.getLogger("slurm_quota.serve")


def encode_header(key: str, response: serve.Response) -> bytes:
    """The header line announcing an answer (see the module doc)."""
    gzipped = -1 if response.gzipped is None else len(response.gzipped)
    header = {
        "key": key,
        "status": response.status,
        "type": response.content_type,
        "body": len(response.body),
        "gzip": gzipped,
        "etag": response.etag,
    }
    return json.dumps(header, separators=(",", ":")).encode() + b"\n"


def run(db_path: str, stdin: object = None, stdout: object = None) -> int:
    """Answer build requests from stdin on stdout until EOF; 0, or 2 on a protocol error."""
    source = stdin if stdin is not None else sys.stdin.buffer
    sink = stdout if stdout is not None else sys.stdout.buffer
    app = serve.App(serve.ReadModel(db_path))
    try:
        for line in source:  # type: ignore[attr-defined]
            key = line.strip().decode("ascii", "replace")
            target = serve.WHOLE_LEDGER_ROUTES.get(key)
            if target is None:
                log.error("builder: unknown request %r", key[:40])
                return 2
            response = app.handle(target)
            assert not isinstance(response, serve.Deferred)
            sink.write(encode_header(key, response))  # type: ignore[attr-defined]
            sink.write(response.body)  # type: ignore[attr-defined]
            if response.gzipped is not None:
                sink.write(response.gzipped)  # type: ignore[attr-defined]
            sink.flush()  # type: ignore[attr-defined]
    except BrokenPipeError:  # the server went away while we wrote
        return 0
    finally:
        app.model.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m slurm_quota.serve_builder DB_PATH` (started by the server process)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m slurm_quota.serve_builder DB_PATH", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    return run(args[0])


if __name__ == "__main__":
    sys.exit(main())
