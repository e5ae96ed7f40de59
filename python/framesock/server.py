"""``framesock-server`` / ``python -m framesock.server``.

Without an app: the seed's server script, done right. It serves one client, prints
``rev client data <payload bytes repr>`` exactly as the seed does, and exits 0.

With ``MODULE:ATTR``: serves that handler (or static reply) until SIGTERM or Ctrl-C, in
``--workers`` processes under a supervisor (see ``framesock.run``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Optional

from framesock import ServerTLS, _cli, start_server
from framesock.workers import app as apps

# `Server` settings that are options too, passed on when given.
SERVER_SETTINGS = (
    "protocol", "request_as", "idle_timeout", "max_connections", "max_connections_per_address",
    "max_frame", "handler_threads", "max_unsent", "max_buffered", "proxy_protocol", "proxy_from",
)  # fmt: skip
# Options that only serving an app takes (the tutorial's one-shot server has its own few).
APP_ONLY = SERVER_SETTINGS + (
    "workers", "path", "backlog", "graceful_timeout", "max_requests", "loop", "app_dir", "log_level", "io_threads",
    "health", "drain_delay",
)  # fmt: skip


# --drain-delay with --health: what a balancer needs to see a failed check (HAProxy: inter 1 s,
# fall 2) before the server stops accepting.
DRAIN_DELAY = 5.0


def worker_count(text: str) -> int:
    """``--workers``: a number, or ``auto``/``0`` for one per core."""
    if text == "auto":
        return 0
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', got {text!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (one per core) or more, got {count}")
    return count


def add_app_options(cli: argparse.ArgumentParser) -> None:
    serving = cli.add_argument_group("serving an app (MODULE:ATTR)")
    add = serving.add_argument
    add("--workers", type=worker_count, default=None, help="worker processes; 'auto' or 0: one per core (default: 1)")
    add("--path", help="serve this Unix socket path instead of --host/--port")
    add("--protocol", choices=("classic", "framed"), default=None, help="classic: one request per connection (default); framed: kept connections")
    add("--request-as", choices=("text", "bytes", "json"), default=None, help="what the handler receives (default: text)")
    add("--idle-timeout", type=float, default=None, help="seconds a kept connection may stay silent (default: 75)")
    add("--max-connections", type=int, default=None, help="connections served at once per worker (default: 1024)")
    add("--max-connections-per-address", type=int, default=None, help="connections one client address may have per worker (default: no limit)")
    add("--max-frame", type=int, default=None, help="largest request payload in bytes (default: 16 MiB)")
    add("--handler-threads", type=int, default=None, help="handler calls at once per worker (default: min(32, cores + 4))")
    add("--max-unsent", type=int, default=None, help="reply bytes a connection may leave unread (default: 64 KiB)")
    add("--max-buffered", type=int, default=None, help="request bytes all connections of a worker may hold (default: 256 MiB)")
    add("--proxy-protocol", action="store_const", const=True, default=None, help="every connection begins with a PROXY protocol v1/v2 header from a balancer (HAProxy send-proxy-v2)")
    add("--proxy-from", action="append", metavar="CIDR", default=None, help="take PROXY headers only from this address or range; repeatable (default: 127.0.0.0/8 and ::1)")
    add("--backlog", type=int, default=1024, help="listen backlog (default: %(default)s)")
    add("--io-threads", type=int, default=None, help="network I/O threads per worker (default: the cores shared out)")
    add("--graceful-timeout", type=float, default=25.0, help="seconds SIGTERM gives exchanges in progress (default: %(default)s)")
    add("--health", metavar="HOST:PORT", help="serve GET /healthz and GET /metrics (Prometheus) over HTTP here")
    add("--drain-delay", type=float, default=None, help="on SIGTERM, seconds /healthz answers 503 before the stop begins (default: %g with --health, else 0)" % DRAIN_DELAY)
    add("--max-requests", type=int, default=None, help="replace a worker after this many requests (plus up to 10 %% jitter)")
    add("--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="event loop for coroutine handlers (default: uvloop if installed)")
    add("--app-dir", help="import the app from this directory (default: the current one)")
    add("--log-level", choices=("debug", "info", "warning", "error"), default=None, help="log level on stderr (default: info with an app, warning without)")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``framesock-server``."""
    cli = _cli.parser(
        "framesock-server",
        "Without APP: answer one length-prefixed request with JSON, as the tutorial's server. "
        "With APP (MODULE:ATTR): serve that handler until SIGTERM or Ctrl-C.",
    )
    cli.add_argument("app", nargs="?", metavar="APP", help="MODULE:ATTR, a handler or a JSON value to serve")
    cli.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    cli.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    cli.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates from this CA (mutual TLS)")
    add_app_options(cli)
    options = cli.parse_args(argv)
    if bool(options.tls_cert) != bool(options.tls_key) or (options.tls_client_ca and not options.tls_cert):
        cli.error("--tls-cert and --tls-key go together (and --tls-client-ca needs them)")
    if options.app is None:
        given = [name for name in APP_ONLY if getattr(options, name) not in (None, cli.get_default(name))]
        if given:
            cli.error(f"--{given[0].replace('_', '-')} needs an app to serve (MODULE:ATTR)")
        logging.basicConfig(level=(options.log_level or "warning").upper(), stream=sys.stderr)
        serve_tutorial(options)
    else:
        try:
            apps.check_spec(options.app)
        except ValueError as err:
            cli.error(str(err))
        serve_app(options)


def announce(address: Any) -> None:
    """With --port 0 nobody knows the port: say it on stderr, so that stdout stays the seed's."""
    if isinstance(address, tuple):
        print(f"framesock-server: listening on {address[0]}:{address[1]}", file=sys.stderr, flush=True)


def serve_tutorial(options: argparse.Namespace) -> None:
    def serve() -> None:
        tls = None
        if options.tls_cert:
            tls = ServerTLS(options.tls_cert, options.tls_key, client_ca=options.tls_client_ca)
        ready = announce if options.port == 0 else None
        exchange = start_server(options.host, options.port, timeout=options.timeout, ready=ready, tls=tls)
        # One write (not print's separate pieces), so the line never interleaves with another process.
        print(f"rev client data {exchange['request_bytes']!r}", flush=True)

    _cli.run("framesock-server", serve)


def serve_app(options: argparse.Namespace) -> None:
    from framesock.workers.run import run

    settings = {name: getattr(options, name) for name in SERVER_SETTINGS if getattr(options, name) is not None}
    workers = options.workers if options.workers is not None else 1
    status = 1

    def serve() -> None:
        nonlocal status
        status = run(
            options.app,
            workers=workers or (os.cpu_count() or 1),
            host=options.host,
            port=options.port,
            path=options.path,
            backlog=options.backlog,
            tls_cert=options.tls_cert,
            tls_key=options.tls_key,
            tls_client_ca=options.tls_client_ca,
            graceful_timeout=options.graceful_timeout,
            max_requests=options.max_requests,
            loop=options.loop,
            app_dir=options.app_dir,
            io_threads=options.io_threads,
            log_level=options.log_level or "info",
            health=options.health,
            drain_delay=options.drain_delay if options.drain_delay is not None else (DRAIN_DELAY if options.health else 0.0),
            ready=announce if options.port == 0 and options.path is None else None,
            timeout=options.timeout,
            **settings,
        )
        if status != 0:
            sys.exit(status)

    _cli.run("framesock-server", serve)


if __name__ == "__main__":
    main()
