"""``python -m socketcomm``: the same command line as the ``socketcomm`` script."""

from socketcomm.cli import main

raise SystemExit(main())
