"""The original demo client, now a thin wrapper: ``python client.py --help`` tells the options."""

from socketcomm.cli import client_main

if __name__ == "__main__":
    raise SystemExit(client_main())
