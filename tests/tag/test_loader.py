"""The decode pools give the same batches: threads, processes with the shared-memory ring, torch's DataLoader."""

from __future__ import annotations

import pytest
import torch

from mlcls.images.preprocess import Preprocess
from mlcls.sources import iter_source
from mlcls.tag.loader import Loader
from tests.helpers.images import bad_input_catalogue, write_images

PRE = Preprocess(size=64, resize_size=72)


def _batches(loader: Loader, records, batch_size: int) -> list[tuple[list[str], list, torch.Tensor]]:
    return [([r.uri for r in b.records], [d.error for d in b.decoded], b.pixels) for b in
            loader.batches(records, batch_size)]


@pytest.mark.parametrize("mode", [{"processes": True}, {"dataloader": True}])
def test_every_pool_gives_the_batches_of_the_thread_pool(tmp_path, mode):
    write_images(tmp_path, 23)
    expected = bad_input_catalogue(tmp_path)
    records = sorted(iter_source(str(tmp_path)), key=lambda r: r.uri)
    want = _batches(Loader(PRE, decode_workers=2, max_pixels=10_000_000), records, 5)
    got = _batches(Loader(PRE, decode_workers=2, max_pixels=10_000_000, **mode), records, 5)
    assert [uris for uris, _, _ in got] == [uris for uris, _, _ in want] == \
        [[r.uri for r in records[i:i + 5]] for i in range(0, len(records), 5)]
    assert [errors for _, errors, _ in got] == [errors for _, errors, _ in want]
    assert sum(e is not None for _, errors, _ in got for e in errors) == \
        sum(kind is not None for kind in expected.values())
    for (_, _, a), (_, _, b) in zip(got, want, strict=True):
        assert a.dtype == torch.uint8 and torch.equal(a, b)
