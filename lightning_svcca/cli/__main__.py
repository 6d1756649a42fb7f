"""``python -m lightning_svcca.cli``."""

from lightning_svcca.cli.main import main

raise SystemExit(main())
