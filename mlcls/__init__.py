"""mlcls: batch multi-label image tagging for large image collections.

The library (this package) runs without Prefect: `mlcls.pipeline.tag` tags a
collection in-process; `flows/` wraps the same steps as Prefect flows.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlcls")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+local"
