"""The `mlcls` command: one module per command group, shared options in `options`, output in
`console`. The entry point is `mlcls.cli.main:main`.
"""
