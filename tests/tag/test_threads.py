"""torch's threads beside the CPU decode threads: the probe keeps the faster split, and gives the threads back."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import polars as pl
import pytest
import torch
import torchvision

from mlcls.bundle import save_bundle
from mlcls.images.preprocess import Preprocess
from mlcls.sources import iter_source
from mlcls.tag import compiling
from mlcls.tag.engine import Engine, clear_engines, get_engine
from mlcls.tag.handoff import FileJob
from mlcls.tag.job import TagOptions, get_bundle, tag_images, thread_balance
from mlcls.tag.loader import Loader
from mlcls.tag.threads import MIN_BATCHES, PREFETCH, PROBE_BATCHES, Split, StageClock, ThreadBalance
from tests.helpers.images import write_images


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _run(balance: ThreadBalance, clock: StageClock, batches: int, cost: dict[int, tuple[float, float]]) -> list[int]:
    """Drive `batches` batches of 4 images; cost[threads] = (model s, decode s) an image under that split."""
    seen = []
    for index in range(batches):
        with balance.batch(index, 4):
            threads = torch.get_num_threads()
            seen.append(threads)
            model, decode = cost[threads]
            time.sleep(4 * model)
            clock.add(4 * decode, 4)  # what the decode threads did meanwhile
    balance.close()
    return seen


@pytest.mark.parametrize(("cost", "winner"), [
    ({2: (0.002, 0.012), 1: (0.004, 0.003)}, 1),  # decoding starved by two model threads: one thread each
    ({2: (0.003, 0.004), 1: (0.009, 0.002)}, 2),  # the model is the slow stage: it keeps both cores
])
def test_the_probe_keeps_the_split_whose_slower_stage_is_faster(two_threads, cost, winner):
    chosen: dict[int, Split] = {}
    clock = StageClock()
    seen = _run(ThreadBalance(chosen, 2, 1, clock, MIN_BATCHES), clock, MIN_BATCHES, cost)
    probe_end = 1 + 2 * PROBE_BATCHES
    assert seen[:probe_end] == [2] + [2] * PROBE_BATCHES + [1] * PROBE_BATCHES
    assert set(seen[probe_end:]) == {winner}
    assert chosen == {1: Split(winner, PREFETCH)}  # no boost arm: the window stays
    assert torch.get_num_threads() == 2  # given back
    again = _run(ThreadBalance(chosen, 2, 1, StageClock(), MIN_BATCHES), StageClock(), 3, cost)
    assert again == [winner] * 3  # the next shard does not probe


class PauseRecorder:
    """A stand-in for `Loader.decode_paused`: records each pause (True) and resume (False)."""

    def __init__(self) -> None:
        self.events: list[bool] = []

    @property
    def active(self) -> bool:
        return bool(self.events) and self.events[-1]

    @contextmanager
    def __call__(self) -> Iterator[None]:
        self.events.append(True)
        yield
        self.events.append(False)


@pytest.mark.parametrize(("boosted_model", "winner"), [
    (0.003, 1),  # lean alone loses (10 ms against 8), with the boost it wins: 5 + 3 × (1 - 5/10) = 6.5 ms
    (0.008, 2),  # a boost too slow to help: 5 + 8 × 0.5 = 9 ms, full stays
])
def test_the_probe_weighs_the_lean_split_with_its_boost(two_threads, boosted_model, winner):
    clock, pause, seen = StageClock(), PauseRecorder(), []
    cost = {(2, False): (0.006, 0.008), (1, False): (0.010, 0.005), (2, True): (boosted_model, 0.0)}
    chosen: dict[int, Split] = {}
    balance = ThreadBalance(chosen, 2, 1, clock, MIN_BATCHES, pause=pause)
    assert balance.window(4) == 4 * PREFETCH
    for index in range(1 + 3 * PROBE_BATCHES + 2):
        with balance.batch(index, 4):  # nothing decoded ahead: only the probe's third arm pauses
            seen.append((torch.get_num_threads(), pause.active))
            model, decode = cost[seen[-1]]
            time.sleep(4 * model)
            clock.add(4 * decode, 4)
    balance.close()
    assert seen[1:1 + 3 * PROBE_BATCHES] == ([(2, False)] * PROBE_BATCHES + [(1, False)] * PROBE_BATCHES
                                             + [(2, True)] * PROBE_BATCHES)
    # the lean split decodes ahead what its batches leave time for: m1/d = 10/5 batches (a sleep overshoots: 3),
    # and two spare
    assert chosen[1].threads == winner and seen[-1] == (winner, False)
    assert chosen[1].prefetch in ((4, 5) if winner == 1 else (PREFETCH,))
    assert balance.window(4) == 4 * chosen[1].prefetch
    assert balance.boosted == 0 and not pause.active  # probe batches are not counted as boosts; decoding resumed


def test_short_shards_and_pinned_threads_are_left_alone(two_threads):
    cost = {2: (0.0, 0.0), 1: (0.0, 0.0)}
    assert _run(ThreadBalance({}, 2, 1, StageClock(), MIN_BATCHES - 1), StageClock(), 8, cost) == [2] * 8
    assert _run(ThreadBalance.off(), StageClock(), MIN_BATCHES, cost) == [2] * MIN_BATCHES


def test_a_long_cpu_run_probes_once_and_its_rows_match_pinned_threads(tmp_path, tiny_bundle, two_threads,
                                                                       monkeypatch):
    write_images(tmp_path / "src", MIN_BATCHES + 2)
    opts = TagOptions(batch_size=1, workers=1, device="cpu", precision="fp32", draft=False)
    clear_engines()
    tag_images(str(tmp_path / "src"), str(tmp_path / "probed"), tiny_bundle, opts)
    engine = get_engine(get_bundle(tiny_bundle), "cpu", precision="fp32", compile=False, batch_size=None)
    assert set(engine.threads_chosen) == {1} and engine.threads_chosen[1].threads in (1, 2)
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice: no probe
    tag_images(str(tmp_path / "src"), str(tmp_path / "pinned"), tiny_bundle, opts)
    a, b = (pl.read_delta(str(tmp_path / d)).sort("uri") for d in ("probed", "pinned"))
    assert a.height == b.height == MIN_BATCHES + 2
    assert a.select("uri", "labels", "error").equals(b.select("uri", "labels", "error"))
    diff = max(abs(x - y) for ra, rb in zip(a["probs"].to_list(), b["probs"].to_list(), strict=True)
               for x, y in zip(ra.values(), rb.values(), strict=True))
    assert diff < 1e-5


def test_the_lean_split_runs_a_batch_on_all_threads_with_decoding_paused_when_the_next_is_ready(two_threads):
    pause = PauseRecorder()
    paused = pause.events
    balance = ThreadBalance({1: Split(1)}, 2, 1, StageClock(), MIN_BATCHES, pause=pause)  # the lean split was chosen
    for ahead, threads, pauses in [(3, 1, []), (4, 2, [True, False]), (0, 1, [])]:
        paused.clear()
        with balance.batch(5, 4, ahead=ahead):
            assert torch.get_num_threads() == threads
            assert paused == pauses[:1]  # paused while the batch runs
        assert paused == pauses  # and resumed after it
    full = ThreadBalance({1: Split(2)}, 2, 1, StageClock(), MIN_BATCHES, pause=pause)  # all threads already: no pause
    with full.batch(5, 4, ahead=100):
        assert torch.get_num_threads() == 2 and paused == []
    balance.close()
    assert balance.boosted == 1 and torch.get_num_threads() == 2


def test_a_paused_loader_reads_but_decodes_nothing_until_the_pause_ends(tmp_path):
    write_images(tmp_path, 6)
    records = sorted(iter_source(str(tmp_path)), key=lambda r: r.uri)
    loader = Loader(Preprocess(size=32, resize_size=36), decode_workers=1)
    try:
        jobs = [FileJob(r) for r in records]
        with loader.decode_paused():
            for job in jobs:
                loader._pool.submit(loader._load, job)
            time.sleep(0.5)
            assert all(job.data is not None for job in jobs) and not any(job.done.is_set() for job in jobs)
            assert loader.decode_clock.read()[1] == 0
        assert all(job.done.wait(30) and job.result.error is None for job in jobs)
        assert loader.decode_clock.read()[1] == len(records)
        batches = loader.batches(records, 2, prefetch=3)
        next(batches)
        deadline = time.monotonic() + 30  # the loader decodes the window ahead meanwhile (a fixed 0.5 s flaked)
        while loader.decode_clock.read()[1] < 2 * len(records) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert next(batches).ahead >= 2  # the batch after it is ready: a boost may pause decoding
    finally:
        loader.close()


@pytest.mark.skipif(compiling.missing_compiler("cpu") is not None, reason="torch.compile needs a C++ compiler")
def test_a_compiled_cpu_engine_is_balanced_with_its_graphs_ready_for_both_splits(two_threads, tmp_path, monkeypatch):
    """Dynamo recompiles when torch's thread count changes: the balance must not time that as the lean split."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    save_bundle(str(tmp_path / "b"), name="r18", arch="resnet18", classes=["a", "b", "c"], thresholds=[0.5] * 3,
                state_dict=torchvision.models.resnet18(num_classes=3).state_dict(),
                preprocess=Preprocess(size=32, resize_size=32))  # resnet18 compiles fastest of the small models
    bundle = get_bundle(str(tmp_path / "b"))
    engine = Engine(bundle, torch.device("cpu"), precision="fp32", compile=True, batch_size=4)
    eager = Engine(bundle, torch.device("cpu"), precision="fp32")
    loader = Loader(bundle.preprocess, decode_workers=1)
    try:
        balance = thread_balance(engine, loader, MIN_BATCHES)
    finally:
        loader.close()
    assert balance.fixed is None and [a.threads for a in balance.arms] == [2, 1, 2]  # it probes, as eager does
    assert balance.thread_counts() == {1, 2}
    torch._dynamo.utils.counters.clear()
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        np.testing.assert_allclose(engine.probs(pixels), eager.probs(pixels), atol=1e-5)
    assert not torch._dynamo.utils.counters["frames"]["total"]  # no recompile: both graphs were built up front


@pytest.mark.skipif(compiling.missing_compiler("cpu") is not None, reason="torch.compile needs a C++ compiler")
def test_compiled_cpu_kernels_take_the_thread_count_when_they_run(tmp_path, monkeypatch):
    """Without `compiling.compile_options` Inductor writes `num_threads(N)` into every parallel loop when N is not
    the core count, and a second thread count would cost a whole compile."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Hardswish(), torch.nn.AdaptiveAvgPool2d(1))
    compiled = torch.compile(model, options=compiling.compile_options("cpu"))
    saved = torch.get_num_threads()
    torch.set_num_threads((os.cpu_count() or 1) + 1)  # not the core count
    try:
        x = torch.rand(4, 3, 32, 32)
        with torch.no_grad():
            out, code = run_and_get_code(compiled, x)
            torch.testing.assert_close(out, model(x))
    finally:
        torch.set_num_threads(saved)
    assert "#pragma omp parallel" in "".join(code) and "num_threads(" not in "".join(code)


def test_a_chosen_split_keeps_its_window_for_the_next_shard_and_never_passes_the_cap(two_threads):
    balance = ThreadBalance({1: Split(1, 8)}, 2, 1, StageClock(), MIN_BATCHES)
    assert balance.window(32) == 32 * 8
    assert balance.window(512) == 512 * PREFETCH  # a wide window only where MAX_AHEAD holds it; the default stays
