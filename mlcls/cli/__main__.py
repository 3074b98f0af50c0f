"""`python -m mlcls.cli`: the `mlcls` command without the console script."""

import sys

from mlcls.cli.main import main

sys.exit(main())
