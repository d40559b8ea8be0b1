"""Allow ``python -m virchow``."""

import sys

from virchow.cli.main import main

sys.exit(main())
