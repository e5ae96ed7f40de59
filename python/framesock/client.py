"""``framesock-client`` / ``python -m framesock.client``: the seed's client script, done right.

Sends one request, prints ``client get json <reply>`` exactly as the seed does, and exits 0.
"""

from __future__ import annotations

from framesock import _cli, start_client


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``framesock-client``."""
    cli = _cli.parser("framesock-client", "Send one length-prefixed request and print the JSON reply.")
    cli.add_argument("--message", default="msg from client", help="text to send (default: %(default)s)")
    options = cli.parse_args(argv)

    def ask() -> None:
        reply = start_client(options.host, options.port, options.message, timeout=options.timeout)
        print(f"client get json {reply!r}", flush=True)

    _cli.run("framesock-client", ask)


if __name__ == "__main__":
    main()
