"""`mlcls report`: a static HTML report of an output, to open from disk.

One streaming pass (`mlcls.output.stats.run_pass`) gathers everything: the stats,
per-class probability histograms, per class the highest-scoring images and
the highest-scoring ones still under the threshold (the images a person
should look at: the model's near misses), and the failed files. Only the
chosen images are then read again, from their source URIs through fsspec,
to make small JPEG thumbnails next to the pages. With many classes the
report stays fast: the `labels` most frequent classes get histograms and
thumbnails, on pages of `PAGE_LABELS`; the rest appear in the index table.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageOps

from mlcls.errors import OutputError
from mlcls.output.reader import OutputTable
from mlcls.output.report_data import ReportData, gather
from mlcls.storage import StorageOptions, describe_os_error, join, read_one, url_to_fs, write_atomic

THUMB_PX = 160


def thumbnail_uris(data: ReportData) -> list[str]:
    """Every image a detailed label shows, once."""
    index = {c: j for j, c in enumerate(data.dataset.classes)}
    seen: dict[str, None] = {}
    for label in data.detailed:
        for which in ("top", "near"):
            for uri, _ in data.tops.images(which, index[label]):
                seen.setdefault(uri, None)
    return list(seen)


def make_thumbnails(uris: Iterable[str], out_dir: str, storage_options: StorageOptions = None,
                    workers: int = 8, probe: int = 16) -> dict[str, str | None]:
    """Small JPEGs under `out_dir/thumbs/`; maps each uri to its relative path, or None if unreadable.

    If the first `probe` sources all fail (moved, deleted, or a store this
    machine cannot reach), the rest are not tried: each try could wait on a
    network timeout, and the report is still useful without pictures.
    """
    fs, base = url_to_fs(out_dir, storage_options)
    uris = list(uris)

    def one(uri: str) -> tuple[str, str | None]:
        name = f"thumbs/{hashlib.sha1(uri.encode()).hexdigest()[:16]}.jpg"
        try:
            data = read_one(uri, storage_options)
            write_atomic(fs, join(base, name), _thumbnail(data))
        except Exception:  # noqa: BLE001 - any failure (I/O, decode, a store's client) only loses this picture
            return uri, None
        return uri, name

    with ThreadPoolExecutor(max_workers=workers) as pool:
        made = dict(pool.map(one, uris[:probe]))
        if uris[:probe] and not any(made.values()):
            return made | dict.fromkeys(uris[probe:])
        return made | dict(pool.map(one, uris[probe:]))


def _thumbnail(data: bytes) -> bytes:
    """A JPEG at most THUMB_PX on its long side, oriented as the camera meant (EXIF)."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (THUMB_PX, THUMB_PX))
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        return buf.getvalue()


def write_output_report(out: str, report_dir: str, storage_options: StorageOptions = None, *, labels: int = 100,
                 thumbs: int = 8) -> tuple[ReportData, list[str]]:
    """Gather, make thumbnails, write the pages; return the data and the pages written (index first)."""
    from mlcls.output.report_pages import render_pages

    dataset = OutputTable.open(out, storage_options)
    data = gather(dataset, labels=labels, thumbs=thumbs)
    data.thumbs = make_thumbnails(thumbnail_uris(data), report_dir, storage_options)
    try:
        fs, base = url_to_fs(report_dir, storage_options)
        pages = render_pages(data)
        for name, html in pages.items():
            write_atomic(fs, join(base, name), html.encode())
    except OSError as err:
        raise OutputError(f"cannot write the report to {report_dir}: {describe_os_error(err)}") from err
    return data, list(pages)
