"""`python -m psa` is the `psa` command."""

from .cli import main

raise SystemExit(main())
