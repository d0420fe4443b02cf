"""`python -m psa` is the `psa` command."""

from psa.cli import main

raise SystemExit(main())
