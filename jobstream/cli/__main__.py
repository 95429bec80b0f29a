"""`python -m jobstream.cli`: the same as the `jobstream` command."""

import sys

from jobstream.cli.main import main

sys.exit(main())
