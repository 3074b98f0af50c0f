"""Python as on the lent GPU machine, for `bash bench/gpu_device.sh dry`: what it lacks cannot be imported.

That machine has torch, torchvision, pyarrow, fsspec, Pillow and numpy but no
registry, and at most 64 MiB travels with a call, so deltalake (52 MB) and
polars cannot go with nvImageCodec (KINDS.md in the device tool's library).
With this folder first on PYTHONPATH the dry run meets the same ImportErrors
the device would, on any machine.
"""

import sys

MISSING = {"deltalake", "polars", "duckdb", "s3fs", "prefect", "moto", "boto3", "botocore", "aiobotocore"}


class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine: bench/devsim)", name=name)
        return None


sys.meta_path.insert(0, _Missing())
