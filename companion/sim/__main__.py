"""``python -m companion.sim``: same as ``ctrlable-companion sim``."""

from companion.sim.cli import main

raise SystemExit(main())
