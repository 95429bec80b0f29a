import sys

from jobstream.cli.main import main

sys.exit(main())
