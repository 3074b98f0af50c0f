"""The engine's choices at run time: precision by CPU features, out-of-memory splitting, compile policy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torchvision

from mlcls.bundle import load_bundle, save_bundle
from mlcls.errors import OptionError
from mlcls.images.preprocess import Preprocess
from mlcls.tag import compiling
from mlcls.tag.engine import Engine, Normaliser, cpu_has_fast_bf16, fold_batchnorm, resolve_precision
from mlcls.tag.job import TagOptions, engine_for, open_run

XEON_AMX = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx512f avx512_vnni " \
           "avx512_bf16 amx_bf16 amx_tile amx_int8\n"
XEON_AVX512 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n"
EPYC_AVX2 = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"


def test_bf16_is_chosen_only_on_cpus_that_compute_it_natively():
    assert cpu_has_fast_bf16(XEON_AMX) and cpu_has_fast_bf16(ZEN4)
    assert not cpu_has_fast_bf16(XEON_AVX512) and not cpu_has_fast_bf16(EPYC_AVX2) and not cpu_has_fast_bf16("")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, XEON_AMX) is torch.bfloat16
    assert resolve_precision("auto", cpu, XEON_AVX512) is None
    assert resolve_precision("fp32", cpu, XEON_AMX) is None  # asked for: kept
    assert resolve_precision("bf16", cpu, EPYC_AVX2) is torch.bfloat16
    with pytest.raises(OptionError):
        resolve_precision("int8", cpu)


def test_this_machine_is_read_without_error():
    assert isinstance(cpu_has_fast_bf16(), bool)


class _Limited(torch.nn.Module):
    """The bundle's model, failing like a full GPU for batches over `limit` images."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.calls = model, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"out of memory: tried a batch of {x.shape[0]} (test model)")
        return self.model(x)


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode with batch-norm statistics and affines far from their init (as after training)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -1, 1), (m.running_var, 0.2, 3), (m.weight.data, 0.5, 2),
                              (m.bias.data, -1, 1)):
                t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def varied_bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`tiny_bundle`'s shape with outputs that differ between images and classes.

    A random-init network in eval mode gives 0.5 for every image (its logits
    are ~1e-9), so a test comparing probabilities on it could not see rows
    swapped or pixels read before they landed.
    """
    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v3_small", num_classes=4)
    for m in model.modules():  # batch-norm statistics of these images, as training leaves them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(Normaliser(Preprocess(size=64), torch.device("cpu"))(_pixels(9, 64)))
    torch.nn.init.normal_(model.eval().classifier[-1].weight, std=1.0)
    out = tmp_path_factory.mktemp("varied") / "bundle"
    save_bundle(str(out), name="varied", arch="mobilenet_v3_small", classes=["a", "b", "c", "d"],
                thresholds=[0.5] * 4, state_dict=model.state_dict(), preprocess=Preprocess(size=64, resize_size=72))
    return str(out)


def _pixels(seed: int, n: int) -> torch.Tensor:
    """Noise around a colour of each image's own: pooled features (and so outputs) differ between images."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    return torch.from_numpy(np.clip(base + rng.integers(-40, 41, (n, 64, 64, 3)), 0, 255).astype(np.uint8))


def _varies(probs: np.ndarray) -> bool:
    return bool(np.ptp(probs, axis=0).min() > 0.05)


def test_out_of_memory_halves_the_batch_carries_on_and_says_so_once(varied_bundle, caplog):
    engine = Engine(load_bundle(varied_bundle), torch.device("cpu"), precision="fp32")
    pixels = _pixels(0, 16)
    expected = np.concatenate([engine.probs(pixels[i:i + 4]) for i in range(0, 16, 4)])
    assert _varies(expected)  # a swapped or repeated part would show
    engine.model = limited = _Limited(engine.model, limit=4)
    with caplog.at_level(logging.WARNING, logger="mlcls.tag.engine"):
        got = engine.probs(pixels)
        again = engine.probs(pixels)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(again, expected, atol=1e-5)
    assert engine.max_batch == 4
    assert limited.calls[:3] == [16, 8, 4]  # halved twice, then batches of 4 from then on
    assert set(limited.calls[3:]) == {4}
    warnings = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "batches of 8" in warnings[0].getMessage()


def test_batch_norm_is_folded_into_the_convolutions_with_the_same_outputs():
    torch.manual_seed(0)
    model = _trained_like(torchvision.models.resnet18(num_classes=6))
    x = torch.rand(3, 3, 64, 64)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20  # the bundle's model is untouched
    with torch.inference_mode():
        expected, got = model(x), folded(x)
    assert expected.abs().max() > 1  # outputs far from zero: the comparison means something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


class _DataDependent(torch.nn.Module):
    """Conv + batch norm behind a branch on the data: FX cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_a_model_that_cannot_be_traced_and_a_training_model_run_as_they_are():
    model = _DataDependent().eval()
    assert fold_batchnorm(model) is model
    training = torchvision.models.resnet18(num_classes=2).train()
    assert fold_batchnorm(training) is training  # batch statistics in training: nothing to fold


def test_the_engine_runs_the_folded_model(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    engine = Engine(bundle, torch.device("cpu"), precision="fp32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in engine.model.modules())
    pixels = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    reference = bundle.build_model()
    with torch.inference_mode():
        expected = torch.sigmoid(reference(engine.normalise(pixels))).numpy()
    np.testing.assert_allclose(engine.probs(pixels), expected, atol=1e-5)


def test_out_of_memory_with_one_image_is_raised(tiny_bundle):
    engine = Engine(load_bundle(tiny_bundle), torch.device("cpu"), precision="fp32")
    engine.model = _Limited(engine.model, limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        engine.probs(torch.zeros((2, 64, 64, 3), dtype=torch.uint8))


def test_submit_returns_what_probs_returns(varied_bundle):
    engine = Engine(load_bundle(varied_bundle), torch.device("cpu"), precision="fp32")
    pixels = _pixels(1, 5)
    pending = engine.submit(pixels)
    got = pending.result()
    assert _varies(got)
    np.testing.assert_array_equal(got, engine.probs(pixels))
    assert engine.submit(pixels[:0]).result().shape == (0, 4)


def test_compile_option_and_auto_policy(tiny_bundle):
    assert TagOptions().validate().compile == "auto"
    assert TagOptions(compile=True).validate().compile == "on"
    assert TagOptions(compile="OFF").validate().compile == "off"
    with pytest.raises(OptionError, match="--compile"):
        TagOptions(compile="sometimes").validate()
    assert compiling.should_compile("on", "cpu", 1) and not compiling.should_compile("off", "cpu", 10**9)
    gpu_even = compiling.break_even_images("cuda", warm=False)
    with_compiler = compiling.missing_compiler("cuda") is None
    assert not compiling.should_compile("auto", "cuda", gpu_even - 1, warm=False)
    assert compiling.should_compile("auto", "cuda", gpu_even, warm=False) == with_compiler
    assert compiling.break_even_images("cuda", warm=True) < gpu_even  # a warm cache: the compile pays sooner
    assert compiling.break_even_images("cuda", model_rate=50_000, warm=False) > gpu_even  # fewer seconds to gain
    assert not compiling.should_compile("auto", "cpu", 10**9, warm=True)  # a CPU runs eager: balanced threads win
    engine = engine_for(load_bundle(tiny_bundle), TagOptions(device="cpu").validate(), images=100)
    assert engine.pad_to is None and not hasattr(engine.model, "_orig_mod")  # a short shard: eager


def test_compile_without_a_compiler_runs_eager_under_auto_and_fails_fast_when_asked(tiny_bundle, tmp_path,
                                                                                   monkeypatch, caplog):
    # a slim container: no g++/gcc on PATH, so Inductor would fail at the first batch (InvalidCxxCompiler)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(compiling, "_WARNED", set())
    assert "g++" in compiling.missing_compiler("cpu") and "gcc" in compiling.missing_compiler("cuda")
    with caplog.at_level("WARNING", logger="mlcls.tag.compiling"):
        assert not compiling.should_compile("auto", "cuda", 10**9, warm=False)
    assert "no C compiler (gcc)" in caplog.text and "running eager" in caplog.text
    with pytest.raises(OptionError, match="--compile on: no C\\+\\+ compiler"):
        compiling.should_compile("on", "cpu", 1)
    with pytest.raises(OptionError, match="--compile off"):
        open_run(str(tmp_path / "out"), tiny_bundle, TagOptions(device="cpu", compile="on"))
    assert not (tmp_path / "out").exists()  # failed before writing anything
    engine = engine_for(load_bundle(tiny_bundle), TagOptions(device="cpu").validate(), images=10**9)
    assert not hasattr(engine.model, "_orig_mod")  # eager: the run goes on
    (tmp_path / "g++").write_text("#!/bin/sh\n")
    (tmp_path / "g++").chmod(0o755)
    assert compiling.missing_compiler("cpu") is None and compiling.should_compile("on", "cpu", 1)


def test_compile_cache_lives_under_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("MLCLS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiling.use_compile_cache() == str(tmp_path / "mlcls" / "inductor")
    assert (tmp_path / "mlcls" / "inductor").is_dir()
    assert not compiling.cache_is_warm()
    (tmp_path / "mlcls" / "inductor" / "fxgraph" / "ab").mkdir(parents=True)  # what an earlier compile leaves
    assert compiling.cache_is_warm()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compiling.use_compile_cache() == str(tmp_path / "mine")  # the user's choice wins


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_give_the_cpu_probabilities(varied_bundle, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, as on the CPU
    bundle = load_bundle(varied_bundle)
    cpu = Engine(bundle, torch.device("cpu"), precision="fp32")
    cuda = Engine(bundle, torch.device("cuda"), precision="fp32")
    batches = [_pixels(2 + k, 8) for k in range(4)]
    expected = [cpu.probs(b) for b in batches]
    assert all(_varies(e) for e in expected)
    pending = [cuda.submit(b.pin_memory()) for b in batches]  # all in flight before the first wait
    for e, p in zip(expected, pending, strict=True):
        np.testing.assert_allclose(p.result(), e, atol=1e-4)


def test_default_decode_workers_use_the_cores():
    import os

    from mlcls.tag.loader import default_decode_workers

    cores = os.cpu_count() or 1
    assert default_decode_workers("cuda") == max(1, cores - 1)  # one core drives the GPU
    assert default_decode_workers("cpu") == max(1, cores // 2)  # beside the model's threads
