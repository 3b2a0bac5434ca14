"""``python -m envoyx``: the ``envoyx`` command."""

from envoyx.cli import main

raise SystemExit(main())
