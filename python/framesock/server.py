"""``framesock-server`` / ``python -m framesock.server``: the seed's server script, done right.

Serves one client, prints ``rev client data <payload bytes repr>`` exactly as the seed does, and
exits 0.
"""

from __future__ import annotations

import sys

from framesock import ServerTLS, _cli, start_server


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``framesock-server``."""
    cli = _cli.parser("framesock-server", "Answer one length-prefixed request with JSON.")
    cli.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    cli.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    cli.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates from this CA (mutual TLS)")
    options = cli.parse_args(argv)
    if bool(options.tls_cert) != bool(options.tls_key) or (options.tls_client_ca and not options.tls_cert):
        cli.error("--tls-cert and --tls-key go together (and --tls-client-ca needs them)")

    def announce(address: tuple[str, int]) -> None:
        # With --port 0 nobody knows the port; say it on stderr so stdout stays the seed's.
        if options.port == 0:
            print(f"framesock-server: listening on {address[0]}:{address[1]}", file=sys.stderr, flush=True)

    def serve() -> None:
        tls = None
        if options.tls_cert:
            tls = ServerTLS(options.tls_cert, options.tls_key, client_ca=options.tls_client_ca)
        exchange = start_server(options.host, options.port, timeout=options.timeout, ready=announce, tls=tls)
        # One write (not print's separate pieces), so the line never interleaves with another process.
        print(f"rev client data {exchange['request_bytes']!r}", flush=True)

    _cli.run("framesock-server", serve)


if __name__ == "__main__":
    main()
