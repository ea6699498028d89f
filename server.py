"""The original demo server, now a thin wrapper: ``python server.py --help`` tells the options."""

from socketcomm.cli import server_main

if __name__ == "__main__":
    raise SystemExit(server_main())
