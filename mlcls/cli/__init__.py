"""The `mlcls` command: one module per command group, shared options in `options`, output in
`console`. The entry point is `mlcls.cli.main:main`.
"""

import time

STARTED = time.perf_counter()  # when the command began: `mlcls tag` reports its wall time from here
