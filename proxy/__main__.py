"""``python -m proxy``: the same as the ``sidelink`` command."""

from proxy.cli import main

raise SystemExit(main())
