"""The decode pools give the same batches: threads, processes with the shared-memory ring, torch's DataLoader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlcls.images.load import ring_jpeg
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


def test_processes_hand_jpegs_for_the_gpu_back_through_the_ring_intact(tmp_path, monkeypatch):
    """JPEGs left for the GPU come back byte for byte, through ring slots (those that fit) or the pipe (larger
    ones), while a small ring is reused many times over; the bad files keep their error rows."""
    import mlcls.tag.loader as loader_module
    from mlcls.images.gpu import GpuJpegDecoder

    paths = write_images(tmp_path, 30) + write_images(tmp_path, 10, seed=1, prefix="big", side=(300, 500))
    bad_input_catalogue(tmp_path)
    room = 64 * 64 * 3 + 1000  # a slot holds a 64 px image's pixels; only the big JPEGs are larger
    assert sum(p.stat().st_size > room for p in paths) == 10
    monkeypatch.setattr(loader_module, "JPEG_SLOT_BYTES", room)
    copied = []
    monkeypatch.setattr(loader_module, "ring_jpeg", lambda ring, d: copied.append(d.slot) or ring_jpeg(ring, d))
    loader = Loader(PRE, decode_workers=2, processes=True, ring_images=12, max_pixels=10_000_000,
                    gpu_decoder=GpuJpegDecoder(PRE, torch.device("cpu"), backend="torchvision"))
    records = sorted(iter_source(str(tmp_path)), key=lambda r: r.uri)
    batches = list(loader.batches(records, 5))
    loader.close()
    decoded = {r.uri: d for b in batches for r, d in zip(b.records, b.decoded, strict=True)}
    assert len(decoded) == len(records)
    for p in paths:
        d = decoded[str(p)]
        assert d.jpeg == p.read_bytes() and d.error is None and d.slot is None and d.ring_bytes is None
    for_gpu = [d for d in decoded.values() if d.jpeg is not None]  # the catalogue's plain JPEGs too
    assert len(copied) == sum(len(d.jpeg) <= room for d in for_gpu) == len(for_gpu) - 10
    assert len(set(copied)) == 12  # every slot used, most of them more than once
    assert sum(d.error is not None for d in decoded.values()) >= 5
