"""`python -m tune` is the `tune` command (how `tune start` spawns its workers)."""
import sys

from tune.cli import main

sys.exit(main())
