"""The GPU decode path. Its logic (batching, fallback, crop) runs here with torchvision's CPU
decoder standing in for nvJPEG; the CUDA test runs where there is a GPU and skips elsewhere."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mlcls.images.decode import Decoded, plain_jpeg_size, prepare
from mlcls.images.gpu import (
    DEVICE_INTERPOLATION,
    BatchFailures,
    FirstWarning,
    GpuJpegDecoder,
    decodes_jpeg_on_gpu,
    probe_jpeg,
    resizes_on_device,
)
from mlcls.images.load import LoadConfig
from mlcls.images.preprocess import INTERPOLATIONS, Preprocess
from mlcls.sources import FileRecord
from mlcls.tag.loader import Loader
from tests.helpers.images import bad_input_catalogue, exif_rotated_jpeg, jpeg_bytes, photo

PRE = Preprocess(size=64, resize_size=72)


def _files(tmp_path):
    rng = np.random.default_rng(0)
    files = {f"ok{i}.jpg": jpeg_bytes(photo(rng, 90 + 10 * i, 120)) for i in range(5)}
    files["grey.jpg"] = jpeg_bytes(photo(rng, 80, 80)[..., 0])
    files["rotated.jpg"] = exif_rotated_jpeg(photo(rng, 60, 100))
    buf = io.BytesIO()
    Image.fromarray(photo(rng, 70, 70)).save(buf, "PNG")
    files["png.png"] = buf.getvalue()
    files["corrupt.jpg"] = files["ok0.jpg"][:200] + b"\x00" * 50 + files["ok0.jpg"][250:]
    files["truncated.jpg"] = files["ok1.jpg"][: len(files["ok1.jpg"]) // 3]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


def test_eligibility(tmp_path):
    files = _files(tmp_path)
    assert plain_jpeg_size(files["ok0.jpg"], 10**8) == (120, 90)
    assert plain_jpeg_size(files["grey.jpg"], 10**8) == (80, 80)
    assert plain_jpeg_size(files["rotated.jpg"], 10**8) is None  # EXIF rotation: CPU path turns it upright
    assert plain_jpeg_size(files["png.png"], 10**8) is None
    assert plain_jpeg_size(files["ok0.jpg"], 1000) is None  # over the limit: the CPU path writes the error row
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 20)).save(cmyk, "JPEG")
    assert plain_jpeg_size(cmyk.getvalue(), 10**8) is None
    assert plain_jpeg_size(files["truncated.jpg"], 10**8) is None  # no end marker: PIL reports it


def _has_nvimgcodec() -> bool:
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


def _run(tmp_path, device: torch.device, processes: bool = False, backend: str = "auto"):
    files = _files(tmp_path)
    loader = Loader(PRE, decode_workers=2, gpu_decoder=GpuJpegDecoder(PRE, device, backend=backend),
                    processes=processes)
    records = [FileRecord(uri=str(tmp_path / name)) for name in files]
    (batch,) = list(loader.batches(records, batch_size=len(records)))
    order, pixels = loader.device_pixels(batch, device)
    return files, records, batch, order, pixels


def _check(files, records, batch, order, pixels):
    names = [r.uri.rsplit("/", 1)[1] for r in batch.records]
    errors = {n: d.error for n, d in zip(names, batch.decoded, strict=True) if d.error}
    assert set(errors) <= {"corrupt.jpg", "truncated.jpg"} and "truncated.jpg" in errors
    assert all(e.startswith("decode: ") for e in errors.values())
    assert sorted(names[i] for i in order) == sorted(set(names) - set(errors))
    assert pixels.shape == (len(order), 64, 64, 3) and pixels.dtype == torch.uint8
    assert all(d.jpeg is None for d in batch.decoded)  # bytes released once decoded
    for k, i in enumerate(order):  # close to the PIL path, pixel for pixel
        reference = prepare(files[names[i]], PRE, draft=False).pixels.astype(int)
        assert np.abs(pixels[k].cpu().numpy().astype(int) - reference).mean() < 4.0, names[i]


@pytest.mark.parametrize("processes", [False, True])
def test_gpu_path_logic_with_the_cpu_decoder(tmp_path, processes):
    _check(*_run(tmp_path, torch.device("cpu"), processes, backend="torchvision"))


@pytest.mark.skipif(not _has_nvimgcodec(), reason="nvImageCodec is not installed")
@pytest.mark.parametrize("processes", [False, True])
def test_gpu_path_through_nvimgcodec_on_its_cpu_backend(tmp_path, processes):
    # the calls the GPU path makes (decode parameters, a batch of bytes, DLPack, None for a bad file),
    # on nvImageCodec's CPU backend: the same library code where CI has no GPU; decode processes fork
    # after the decoder exists, as on a GPU box
    decoder = GpuJpegDecoder(PRE, torch.device("cpu"), backend="nvimgcodec")
    assert decoder.backend == "nvimgcodec"
    _check(*_run(tmp_path, torch.device("cpu"), processes, backend="nvimgcodec"))
    files = _files(tmp_path)
    got = decoder.decode([files["ok0.jpg"], files["corrupt.jpg"][:100], files["ok2.jpg"]])
    assert got[1] is None and got[0] is not None and got[2] is not None  # one bad file fails only itself
    assert got[0].shape == (64, 64, 3) and got[0].dtype == torch.uint8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_path_on_cuda(tmp_path):
    files, records, batch, order, pixels = _run(tmp_path, torch.device("cuda"))
    assert pixels.device.type == "cuda"
    _check(files, records, batch, order, pixels)


def _torchvision_uint8(img: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """The reference: torchvision's own uint8 tensor resize and crop, one image at a time."""
    mode = DEVICE_INTERPOLATION[pre.interpolation]
    if pre.resize_mode == "squash":
        out = TF.resize(img, [pre.size, pre.size], interpolation=mode, antialias=True)
    else:
        out = TF.center_crop(TF.resize(img, pre.resize_size, interpolation=mode, antialias=True), pre.size)
    return out.permute(1, 2, 0)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("resize_mode", ["shorter", "squash"])
@pytest.mark.parametrize("interpolation", sorted(DEVICE_INTERPOLATION))
def test_a_mixed_size_batch_gets_torchvisions_uint8_pixels_bit_for_bit(interpolation, resize_mode, device):
    # same sizes share a resize call, lone sizes get their own, all are rounded together: the pixels must
    # still be those of torchvision's uint8 resize image by image (bicubic overshoots: the clamp matters)
    pre = Preprocess(size=64, resize_size=72, interpolation=interpolation, resize_mode=resize_mode)
    decoder = GpuJpegDecoder(pre, torch.device(device), backend="torchvision")
    rng = np.random.default_rng(3)
    sizes = [(90, 120), (90, 120), (120, 90), (301, 203), (64, 64), (90, 120), (77, 200)]
    images = [torch.from_numpy(photo(rng, h, w)).permute(2, 0, 1).contiguous().to(device) for h, w in sizes]
    images[4][:, ::2] = 255  # hard edges, where bicubic rings past 0 and 255
    images[4][:, 1::2] = 0
    got = decoder.resize_crop_batch([images[0], None, *images[1:]])
    assert got[1] is None
    for img, out in zip(images, [got[0], *got[2:]], strict=True):
        assert out.shape == (64, 64, 3) and out.dtype == torch.uint8
        assert torch.equal(out, _torchvision_uint8(img, pre))
        assert torch.equal(out, decoder.resize_crop(img))
    assert torch.equal(decoder.resize_crop(torch.stack(images[:2])), torch.stack([got[0], got[2]]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_a_gpu_decoder_auto_falls_back_and_asking_for_nvimgcodec_says_how_to_install(caplog):
    # without a GPU, nvImageCodec (installed or not) decodes no JPEG on cuda:0: the probe says so
    if _has_nvimgcodec():
        from nvidia import nvimgcodec

        assert not decodes_jpeg_on_gpu(nvimgcodec, torch.device("cuda", 0))
    with pytest.raises(ImportError, match=r"mlcls\[gpu\]"):
        GpuJpegDecoder(PRE, torch.device("cuda", 0), backend="nvimgcodec")
    assert GpuJpegDecoder(PRE, torch.device("cuda", 0)).backend == "torchvision"  # auto falls back
    if _has_nvimgcodec():
        assert "is libnvjpeg installed" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and _has_nvimgcodec()), reason="needs CUDA and nvImageCodec")
def test_nvimgcodec_path_on_cuda(tmp_path):
    files, records, batch, order, pixels = _run(tmp_path, torch.device("cuda"), backend="nvimgcodec")
    assert pixels.device.type == "cuda"
    _check(files, records, batch, order, pixels)


def test_the_gpu_probe_image_is_a_jpeg_the_gpu_path_takes():
    data = probe_jpeg()
    assert plain_jpeg_size(data, 10**8) == (64, 64)  # baseline, 4:2:0, no EXIF: what the GPU decoders get
    assert prepare(data, PRE, draft=False).error is None


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and _has_nvimgcodec()), reason="needs CUDA and nvImageCodec")
def test_nvimgcodec_decodes_on_the_gpu_here():
    from nvidia import nvimgcodec

    # False where libnvjpeg is missing: nvImageCodec would then decode every JPEG on the CPU
    assert decodes_jpeg_on_gpu(nvimgcodec, torch.device("cuda"))
    assert GpuJpegDecoder(PRE, torch.device("cuda")).backend == "nvimgcodec"


def _errors(records: list[FileRecord], gpu: GpuJpegDecoder | None) -> dict[str, str | None]:
    loader = Loader(PRE, decode_workers=2, gpu_decoder=gpu, max_pixels=10**7)
    (batch,) = list(loader.batches(records, batch_size=len(records)))
    if gpu is not None:
        loader.device_pixels(batch, gpu.device)
    return {r.uri.rsplit("/", 1)[1]: d.error for r, d in zip(batch.records, batch.decoded, strict=True)}


@pytest.mark.parametrize("backend", ["nvimgcodec", "torchvision"])
def test_the_gpu_path_gives_the_cpu_paths_error_rows_on_the_hostile_catalogue(tmp_path, backend):
    if backend == "nvimgcodec" and not _has_nvimgcodec():
        pytest.skip("nvImageCodec is not installed")
    expected = bad_input_catalogue(tmp_path)
    _files(tmp_path)  # and the corrupt and truncated JPEGs the GPU decoders see
    records = [FileRecord(uri=str(p)) for p in sorted(tmp_path.iterdir())]
    cpu = _errors(records, None)
    assert {n: e.split(":")[0] if e else None for n, e in cpu.items() if n in expected} == expected
    assert _errors(records, GpuJpegDecoder(PRE, torch.device("cpu"), backend=backend)) == cpu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["nvimgcodec", "torchvision"])
def test_a_cuda_run_gives_the_cpu_runs_error_rows_on_the_hostile_catalogue(tmp_path, backend):
    if backend == "nvimgcodec" and not _has_nvimgcodec():
        pytest.skip("nvImageCodec is not installed")
    bad_input_catalogue(tmp_path)
    _files(tmp_path)
    records = [FileRecord(uri=str(p)) for p in sorted(tmp_path.iterdir())]
    gpu = GpuJpegDecoder(PRE, torch.device("cuda"), backend=backend)
    assert gpu.backend == backend
    assert _errors(records, gpu) == _errors(records, None)


@pytest.mark.parametrize("mode", sorted(INTERPOLATIONS))
def test_the_device_resize_takes_exactly_the_interpolations_it_claims(mode):
    pre = Preprocess(size=32, resize_size=36, interpolation=mode)
    img = torch.from_numpy(photo(np.random.default_rng(3), 50, 70)).permute(2, 0, 1).contiguous()
    if resizes_on_device(pre):
        assert GpuJpegDecoder(pre, torch.device("cpu"), backend="torchvision").resize_crop(img).shape == (32, 32, 3)
    else:  # torchvision has no tensor resize for it: the loader decodes such bundles' images on the CPU
        with pytest.raises(ValueError, match="no GPU implementation"):
            GpuJpegDecoder(pre, torch.device("cpu"), backend="torchvision")
        raw = GpuJpegDecoder.__new__(GpuJpegDecoder)
        raw.pre, raw.interpolation = pre, InterpolationMode(mode)
        with pytest.raises((ValueError, NotImplementedError)):
            raw.resize_crop(img)


def test_nearest_on_the_device_picks_the_pixels_pil_picks():
    pre = Preprocess(size=40, resize_size=48, interpolation="nearest")
    data = jpeg_bytes(photo(np.random.default_rng(4), 97, 131))
    (got,) = GpuJpegDecoder(pre, torch.device("cpu"), backend="torchvision").decode([data])
    reference = prepare(data, pre, draft=False).pixels
    assert np.array_equal(got.numpy(), reference)


def test_a_size_group_the_device_cannot_resize_takes_the_cpu_path(tmp_path, monkeypatch):
    decoder = GpuJpegDecoder(PRE, torch.device("cpu"), backend="torchvision")
    resample = decoder._resample

    def refuse_wide(batch: torch.Tensor) -> torch.Tensor:  # as the CUDA antialias kernel refuses a huge scale
        if batch.shape[-1] > 150:
            raise RuntimeError("Provided interpolation parameters can not be handled with current algorithm")
        return resample(batch)

    monkeypatch.setattr(decoder, "_resample", refuse_wide)
    rng = np.random.default_rng(5)
    datas = [jpeg_bytes(photo(rng, 90, 120)), jpeg_bytes(photo(rng, 90, 400))]
    got = decoder.decode(datas)
    assert got[0] is not None and got[1] is None  # None: the caller decodes it on the CPU
    items = [Decoded(pixels=None, jpeg=d) for d in datas]
    out = decoder.decode_or_fallback(items, LoadConfig(preprocess=PRE, draft=False))
    assert all(img is not None and img.shape == (64, 64, 3) for _, img in out)
    np.testing.assert_array_equal(out[1][1].numpy(), prepare(datas[1], PRE, draft=False).pixels)


def test_out_of_device_memory_in_the_resize_sends_images_to_the_cpu_path_and_says_so_once(monkeypatch, caplog):
    decoder = GpuJpegDecoder(PRE, torch.device("cpu"), backend="torchvision")
    rng = np.random.default_rng(6)
    images = [torch.from_numpy(photo(rng, h, w)).permute(2, 0, 1).contiguous()
              for h, w in [(90, 120), (90, 400), (90, 120), (100, 130)]]
    expected = [decoder.resize_crop(img) for img in images]
    resample = decoder._resample

    def short_on_wide(batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[-1] > 150:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return resample(batch)

    monkeypatch.setattr(decoder, "_resample", short_on_wide)
    for _ in range(2):
        got = decoder.resize_crop_batch(images)
        assert got[1] is None  # the caller decodes it on the CPU
        assert all(torch.equal(got[i], expected[i]) for i in (0, 2, 3))
    assert caplog.text.count("out of memory") == 1 and "90x400" in caplog.text


def test_out_of_device_memory_rounding_the_batch_rounds_it_in_parts_with_the_same_pixels(monkeypatch, caplog):
    import mlcls.images.gpu as gpu

    decoder = GpuJpegDecoder(PRE, torch.device("cpu"), backend="torchvision")
    rng = np.random.default_rng(7)
    images = [torch.from_numpy(photo(rng, h, w)).permute(2, 0, 1).contiguous()
              for h, w in [(90, 120), (91, 120), (90, 120)]]
    expected = [decoder.resize_crop(img) for img in images]
    to_uint8 = gpu._to_uint8

    def short_on_big(img: torch.Tensor) -> torch.Tensor:  # the whole batch's copy does not fit, a part does
        if len(img) == len(images):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return to_uint8(img)

    monkeypatch.setattr(gpu, "_to_uint8", short_on_big)
    got = decoder.resize_crop_batch(images)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert "rounding a batch of 3" in caplog.text


def _faulty_decoder(failing_calls, rest: int, longest: int = 4096) -> tuple[GpuJpegDecoder, list[int]]:
    """A decoder as if nvImageCodec were loaded, its batch call a stand-in that raises on the calls (1-based)
    `failing_calls` accepts, as a library or driver fault does (the whole batch, not one image's None), and
    decodes with torchvision's CPU decoder otherwise; with the list of its calls' batch sizes."""
    decoder = GpuJpegDecoder(PRE, torch.device("cpu"), backend="torchvision")
    decoder._nv = object()
    decoder._nv_failing = BatchFailures(decoder._first, rest=rest, longest=longest)
    calls: list[int] = []
    healthy = decoder._decode_torchvision

    def stand_in(datas):
        calls.append(len(datas))
        if failing_calls(len(calls)):
            raise RuntimeError("nvImageCodec: CUDA driver failure")
        return healthy(datas)

    decoder._decode_nvimgcodec = stand_in
    return decoder, calls


def test_a_library_fault_on_whole_batches_is_said_once_and_rests_the_gpu_decoder(caplog):
    decoder, calls = _faulty_decoder(lambda call: call in (1, 2, 3, 5, 6, 7), rest=2)
    healthy = decoder._decode_torchvision
    rng = np.random.default_rng(8)
    datas = [jpeg_bytes(photo(rng, 90, 120)), jpeg_bytes(photo(rng, 80, 100))]
    expected = decoder.resize_crop_batch(healthy(datas))
    got = []
    for _ in range(10):
        decoder.next_batch()  # the loader counts every batch it hands to the device
        got.append(decoder.decode(datas))
    # batches 1-3 fail, 4-5 rest (not asked), 6 decodes, 7-9 fail (a second row), 10 rests
    assert len(calls) == 7
    for k, images in enumerate(got, start=1):
        if k == 6:
            assert all(torch.equal(a, b) for a, b in zip(images, expected, strict=True))
        else:
            assert images == [None, None]  # the caller decodes them on the CPU
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("failed a batch" in w for w in warnings) == 1
    assert sum("in a row" in w for w in warnings) == 1


def test_a_fault_that_stays_is_retried_ever_more_rarely():
    failures = BatchFailures(FirstWarning(), give_up=3, rest=2, longest=8)
    tried = []
    for batch in range(1, 30):
        if not failures.resting():
            tried.append(batch)
            failures.failed(4, RuntimeError("driver fault"))
    assert tried == [1, 2, 3, 6, 11, 20, 29]  # rests of 2, 4, 8, then capped at 8
    while failures.resting():
        pass
    failures.succeeded()
    for _ in range(3):
        failures.failed(4, RuntimeError("again"))
    assert failures.rests and failures.resting_left == 2  # after a success the next rest is short again


def _failing_loader(tmp_path, processes: bool, rest: int) -> tuple[Loader, list[FileRecord], list[int]]:
    rng = np.random.default_rng(5)
    records = []
    for i in range(120):
        path = tmp_path / f"{i:03d}.jpg"
        path.write_bytes(jpeg_bytes(photo(rng, 60 + i % 7, 80)))
        records.append(FileRecord(uri=str(path)))
    decoder, calls = _faulty_decoder(lambda call: True, rest=rest, longest=rest)  # a fault that stays
    return Loader(PRE, decode_workers=2, gpu_decoder=decoder, processes=processes), records, calls


@pytest.mark.parametrize("processes", [False, True])
def test_while_the_gpu_decoder_rests_the_decode_workers_decode_its_jpegs(tmp_path, processes):
    loader, records, calls = _failing_loader(tmp_path, processes, rest=1000)
    plain = Loader(PRE, decode_workers=1)
    with_jpegs = 0
    try:
        for batch, reference in zip(loader.batches(records, batch_size=4), plain.batches(records, batch_size=4),
                                    strict=True):
            with_jpegs += bool(batch.gpu)
            order, pixels = loader.device_pixels(batch, torch.device("cpu"))
            assert sorted(order) == list(range(4))  # every image has pixels: the CPU path took the failed batches
            assert torch.equal(pixels, reference.pixels[order])  # the same pixels as a run without a GPU
    finally:
        loader.close(wait=True)
        plain.close(wait=True)
    assert len(calls) == 3  # three failures in a row, then the rest outlasts the shard
    # only the batches already read when the rest began carried JPEG bytes (to the feeding thread)
    assert 3 <= with_jpegs <= 8, with_jpegs


@pytest.mark.parametrize("processes", [False, True])
def test_a_rest_ends_after_its_batches_though_none_of_them_carried_jpegs(tmp_path, processes):
    loader, records, calls = _failing_loader(tmp_path, processes, rest=6)
    try:
        for batch in loader.batches(records, batch_size=4):
            loader.device_pixels(batch, torch.device("cpu"))
    finally:
        loader.close(wait=True)
    assert len(calls) > 3  # after 6 batches of rest the workers left JPEGs for the GPU again, and it was retried
