"""`python -m workers` is the `streamrec` command."""

from workers.cli import main

raise SystemExit(main())
