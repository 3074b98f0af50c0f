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
    loader = Loader(PRE, decode_workers=2, max_pixels=10_000_000, **mode)
    next(loader.batches(records, 5))  # a pass given up after one batch does not disturb the next
    got = _batches(loader, records, 5)
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



def test_processes_hand_jpegs_for_the_gpu_back_through_the_arena_intact(tmp_path, monkeypatch):
    """JPEGs left for the GPU come back byte for byte: through arena spans, taking in chunks in flight when the
    arena is full, and through the pipe when a file outgrows the span guessed for an unlisted size, while a small
    arena wraps many times over."""
    import mlcls.images.arena as arena_module
    from mlcls.images.arena import ByteArena
    from mlcls.images.gpu import GpuJpegDecoder
    from mlcls.sources import FileRecord

    paths = write_images(tmp_path, 40) + write_images(tmp_path, 8, seed=1, prefix="big", side=(300, 500))
    bad_input_catalogue(tmp_path)
    biggest = max(p.stat().st_size for p in paths)
    monkeypatch.setattr(arena_module, "ARENA_BYTES", int(2.5 * biggest))  # the big files come first: it fills up
    monkeypatch.setattr(arena_module, "UNLISTED_BYTES", min(p.stat().st_size for p in paths if "big" in p.name) - 1)
    read = ByteArena.read
    through_arena = []
    monkeypatch.setattr(ByteArena, "read", lambda self, at, n: through_arena.append(n) or read(self, at, n))
    loader = Loader(PRE, decode_workers=2, processes=True, ring_images=12, max_pixels=10_000_000,
                    gpu_decoder=GpuJpegDecoder(PRE, torch.device("cpu"), backend="torchvision"))
    records = sorted(iter_source(str(tmp_path)), key=lambda r: r.uri)
    unlisted = ("img0003", "big0002")  # no listed size: a guessed span, which the big one does not fit
    records = [FileRecord(r.uri) if any(u in r.uri for u in unlisted) else r for r in records]
    first = next(loader.batches(records, 5))  # a pass given up after one batch: its tasks may still run
    through_arena.clear()
    batches = list(loader.batches(records, 5))
    loader.close()
    decoded = {r.uri: d for b in batches for r, d in zip(b.records, b.decoded, strict=True)}
    assert len(decoded) == len(records) and len(first.records) == 5
    for p in paths:
        d = decoded[str(p)]
        assert d.jpeg == p.read_bytes() and d.error is None and d.jpeg_at is None and d.jpeg_len is None
    for_gpu = [d for d in decoded.values() if d.jpeg is not None]  # the catalogue's plain JPEGs too
    assert len(for_gpu) > len(paths) and len(through_arena) == len(for_gpu) - 1  # all but the big unlisted one
    assert sum(d.error is not None for d in decoded.values()) >= 5


def test_the_arena_hands_out_spans_that_never_overlap_while_in_use():
    """A random walk of takes, frees (first in, first out) and give-backs against a list of the spans in use."""
    import random

    from mlcls.images.arena import ByteArena

    arena, rng, live, taken, refused = ByteArena(10_000), random.Random(0), [], 0, 0
    for _ in range(20_000):
        if live and rng.random() < 0.45:
            arena.free_oldest()
            live.pop(0)
            continue
        if live and rng.random() < 0.1:  # a reservation given back (`Loader._reserve`)
            arena.free_newest()
            live.pop()
            continue
        size = rng.choice([None, 0, 20_000, *range(1, 4_000, 7)])
        span = arena.take(size)
        if span is None:
            refused += 1
            assert size in (None, 0, 20_000) or sum(n for _, n in live) + size > 10_000 - 4_000 or live
            continue
        start, n = span
        assert n == size and start >= 0 and start + n <= 10_000
        assert all(start + n <= a or a + m <= start for a, m in live)
        live.append(span)
        taken += 1
    assert arena.in_use == len(live) and taken > 5_000 and refused > 1_000


def test_a_widened_window_decodes_further_ahead_and_keeps_the_batches(tmp_path):
    """The thread balance widens the window mid-shard (`threads.py`): the loader reads it per image."""
    write_images(tmp_path / "src", 24)
    records = sorted(iter_source(str(tmp_path / "src")), key=lambda r: r.uri)
    want = _batches(Loader(PRE, decode_workers=2, max_pixels=10_000_000), records, 4)
    loader = Loader(PRE, decode_workers=2, max_pixels=10_000_000)
    sizes = iter([4] * 8 + [20] * 100)  # 1 batch ahead for the first images, then 5
    submitted: list[int] = []

    def counted():
        for i, r in enumerate(records):
            submitted.append(i)
            yield r

    got, lead = [], []
    for b in loader.batches(counted(), 4, window=lambda size: next(sizes)):
        got.append(([r.uri for r in b.records], [d.error for d in b.decoded], b.pixels))
        lead.append(len(submitted) - 4 * len(got))  # files handed to the workers beyond this batch
    assert lead[0] <= 4 and max(lead) >= 12  # ahead by a batch at first, by several once widened
    assert [u for u, _, _ in got] == [u for u, _, _ in want]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(got, want, strict=True))
