"""The decode pools give the same batches: threads, processes with the shared-memory ring, torch's DataLoader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlcls.images.preprocess import Preprocess
from mlcls.sources import iter_source
from mlcls.tag.loader import Loader
from tests.helpers.images import bad_input_catalogue, write_images

PRE = Preprocess(size=64, resize_size=72)
ROOT = Path(__file__).resolve().parents[2]


def _batches(loader: Loader, records, batch_size: int) -> list[tuple[list[str], list, torch.Tensor]]:
    return [([r.uri for r in b.records], [d.error for d in b.decoded], b.pixels) for b in
            loader.batches(records, batch_size)]


def _compare(folder: str, mode: dict) -> None:
    """The batches of the pool `mode` equal the thread pool's, bad files included (errors in the same places)."""
    records = sorted(iter_source(folder), key=lambda r: r.uri)
    want = _batches(Loader(PRE, decode_workers=2, max_pixels=10_000_000), records, 5)
    got = _batches(Loader(PRE, decode_workers=2, max_pixels=10_000_000, **mode), records, 5)
    assert [uris for uris, _, _ in got] == [uris for uris, _, _ in want] == \
        [[r.uri for r in records[i:i + 5]] for i in range(0, len(records), 5)]
    assert [errors for _, errors, _ in got] == [errors for _, errors, _ in want]
    for (_, _, a), (_, _, b) in zip(got, want, strict=True):
        assert a.dtype == torch.uint8 and torch.equal(a, b)


def test_the_process_pool_gives_the_batches_of_the_thread_pool(tmp_path):
    write_images(tmp_path, 23)
    expected = bad_input_catalogue(tmp_path)
    _compare(str(tmp_path), {"processes": True})
    assert sum(kind is not None for kind in expected.values()) >= 5  # error rows compared in place too


def test_the_dataloader_gives_the_batches_of_the_thread_pool_after_prefect_ran(tmp_path):
    """In a fresh interpreter where a Prefect test harness ran first: its services' exit hooks made forked
    DataLoader workers exit with status 1 after doing their work (`loader._forget_parent_exit_hooks`)."""
    write_images(tmp_path, 23)
    bad_input_catalogue(tmp_path)
    script = ("from prefect.testing.utilities import prefect_test_harness\n"
              "with prefect_test_harness():\n    pass\n"
              f"from tests.tag.test_loader import _compare; _compare({str(tmp_path)!r}, {{'dataloader': True}})")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("pool", ["threads", "processes", "dataloader"])
def test_every_pool_is_an_option(pool):
    from mlcls.tag.job import TagOptions

    assert TagOptions(decode_pool=pool).validate().decode_pool == pool
