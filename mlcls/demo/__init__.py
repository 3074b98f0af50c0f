"""The demo: generated shapes (`synth`), the embedded bundle (`bundle/`) and how it is built
(`build`; `python -m mlcls.demo`).
"""
