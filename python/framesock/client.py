"""``framesock-client`` / ``python -m framesock.client``: the seed's client script, done right.

Sends one request, prints ``client get json <reply>`` exactly as the seed does, and exits 0.
"""

from __future__ import annotations

from framesock import ClientTLS, _cli, start_client


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``framesock-client``."""
    cli = _cli.parser("framesock-client", "Send one length-prefixed request and print the JSON reply.")
    cli.add_argument("--message", default="msg from client", help="text to send (default: %(default)s)")
    cli.add_argument("--tls", action="store_true", help="use TLS")
    cli.add_argument("--tls-ca", metavar="PEM", help="CA bundle to trust (default: the system's); implies --tls")
    cli.add_argument("--tls-cert", metavar="PEM", help="client certificate to present; implies --tls")
    cli.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    cli.add_argument("--tls-server-name", metavar="NAME", help="name to check the server's certificate against")
    options = cli.parse_args(argv)
    if bool(options.tls_cert) != bool(options.tls_key):
        cli.error("--tls-cert and --tls-key go together")
    use_tls = options.tls or any([options.tls_ca, options.tls_cert, options.tls_server_name])

    def ask() -> None:
        tls = None
        if use_tls:
            tls = ClientTLS(
                options.tls_ca, cert=options.tls_cert, key=options.tls_key, server_name=options.tls_server_name
            )
        reply = start_client(options.host, options.port, options.message, timeout=options.timeout, tls=tls)
        print(f"client get json {reply!r}", flush=True)

    _cli.run("framesock-client", ask)


if __name__ == "__main__":
    main()
