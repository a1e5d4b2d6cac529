"""core.discovery: a walk's instances as folder listings, and when a walk beats listing folders."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from dicomfuse.core.discovery import StoreTree, WalkDetector, build_tree
from dicomfuse.core.paths import DicomPath, Level
from dicomfuse.core.tree import Entry, ListingCache
from dicomfuse.stores.base import InstanceInfo

UID = "1.2.826.0.1.3680043.8.498."


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def folder(store: str, *uids: str) -> DicomPath:
    return DicomPath((store, *uids))


# -- build_tree and listings ------------------------------------------------------------------------


def test_build_tree_groups_by_study_and_series_with_instance_names() -> None:
    tree = build_tree(
        [
            InstanceInfo("1.1", "1.1.1", "1.1.1.1", 10),
            InstanceInfo("1.2", "1.2.1", "1.2.1.1", None),
            InstanceInfo("1.1", "1.1.2", "1.1.2.1", 30),
            InstanceInfo("1.1", "1.1.1", "1.1.1.2", 20),
        ]
    )
    assert tree.studies == {
        "1.1": {"1.1.1": {"1.1.1.1.dcm": 10, "1.1.1.2.dcm": 20}, "1.1.2": {"1.1.2.1.dcm": 30}},
        "1.2": {"1.2.1": {"1.2.1.1.dcm": None}},
    }


def test_build_tree_consumes_an_iterator_and_keeps_the_last_size_of_a_repeat() -> None:
    def walk() -> Iterator[InstanceInfo]:
        yield InstanceInfo("1.1", "1.1.1", "1.1.1.1", None)
        yield InstanceInfo("1.1", "1.1.1", "1.1.1.1", 42)

    assert build_tree(walk()).studies == {"1.1": {"1.1.1": {"1.1.1.1.dcm": 42}}}
    assert build_tree([]).studies == {}
    assert list(build_tree([]).listings("s")) == []


def test_listings_of_every_study_and_series_folder() -> None:
    tree = build_tree(
        [
            InstanceInfo("1.1", "1.1.1", "1.1.1.1", 10),
            InstanceInfo("1.1", "1.1.1", "1.1.1.2", None),
            InstanceInfo("1.1", "1.1.2", "1.1.2.1", 10),
            InstanceInfo("1.2", "1.2.1", "1.2.1.1", 7),
        ]
    )
    listings = dict(tree.listings("store-a"))
    assert listings == {
        folder("store-a", "1.1"): [("1.1.1", Entry(True)), ("1.1.2", Entry(True))],
        folder("store-a", "1.1", "1.1.1"): [("1.1.1.1.dcm", Entry(False, 10)), ("1.1.1.2.dcm", Entry(False))],
        folder("store-a", "1.1", "1.1.2"): [("1.1.2.1.dcm", Entry(False, 10))],
        folder("store-a", "1.2"): [("1.2.1", Entry(True))],
        folder("store-a", "1.2", "1.2.1"): [("1.2.1.1.dcm", Entry(False, 7))],
    }
    assert {p.level for p in listings} == {Level.STUDY, Level.SERIES}
    # A study's listing comes before its series' listings (a reader may stop early).
    order = [p.parts for p in listings]
    assert order.index(("store-a", "1.1")) < order.index(("store-a", "1.1", "1.1.1"))


def test_listings_go_straight_into_the_listing_cache() -> None:
    tree = StoreTree({"1.1": {"1.1.1": {"1.1.1.1.dcm": 5}}})
    cache = ListingCache(60.0)
    for path, children in tree.listings("s"):
        cache.put(path, children)
    assert cache.get(folder("s", "1.1")) == {"1.1.1": Entry(True)}
    assert cache.get(folder("s", "1.1", "1.1.1")) == {"1.1.1.1.dcm": Entry(False, 5)}
    assert cache.lookup(folder("s", "1.1", "1.1.1"), "1.1.1.1.dcm") == Entry(False, 5)


def synthetic_walk(studies: int, series: int, instances: int, *, sized: bool = True) -> Iterator[InstanceInfo]:
    """UIDs as long as real ones (about 64 characters)."""
    for st in range(studies):
        study = f"{UID}{10**30 + st}"
        for se in range(series):
            series_uid = f"{study}.{se}"
            for i in range(instances):
                yield InstanceInfo(study, series_uid, f"{series_uid}.{10**12 + i}", 100_000 + i if sized else None)


def test_100000_instances_build_fast() -> None:
    infos = list(synthetic_walk(1_000, 2, 50))
    assert len(infos) == 100_000
    started = time.perf_counter()
    tree = build_tree(infos)
    built = time.perf_counter() - started
    listings = list(tree.listings("s"))
    total = time.perf_counter() - started
    assert built < 0.5, built
    assert total < 2.0, total
    assert len(listings) == 1_000 + 2_000
    assert sum(len(children) for path, children in listings if path.level == Level.SERIES) == 100_000


@pytest.mark.parametrize("sized", [True, False])
def test_memory_per_instance_is_modest(sized: bool) -> None:
    count = 100_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tree = build_tree(synthetic_walk(100, 10, count // 1_000, sized=sized))
        after_tree = tracemalloc.get_traced_memory()[0]
        cache = ListingCache(60.0)
        for path, children in tree.listings("s"):
            cache.put(path, children)
        after_cache = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_instance_tree = (after_tree - before) / count
    per_instance_cached = (after_cache - after_tree) / count
    # Measured: about 170 bytes per instance in the tree (mostly its name), 40 in the cache.
    assert per_instance_tree < 1024, per_instance_tree
    assert per_instance_cached < 1024, per_instance_cached


# -- WalkDetector -----------------------------------------------------------------------------------


def make_detector(**kwargs: object) -> tuple[WalkDetector, FakeClock]:
    clock = FakeClock()
    return WalkDetector(clock=clock, **kwargs), clock  # type: ignore[arg-type]


def list_folders(
    detector: WalkDetector, store: str, count: int, *, start: int = 0, hint: int | None = 10
) -> list[bool]:
    """``count`` listings of different series folders of ``store``, at the same moment."""
    return [
        detector.listed(store, Level.SERIES, hint, folder=folder(store, "1.1", f"1.1.{i}"))
        for i in range(start, start + count)
    ]


def test_trigger_listings_of_different_folders_mean_a_walk() -> None:
    detector, _ = make_detector(trigger=3)
    assert list_folders(detector, "s", 3) == [False, False, True]


def test_study_and_series_listings_both_count_other_levels_never() -> None:
    detector, _ = make_detector(trigger=3)
    assert not detector.listed("s", Level.STUDY, 10, folder=folder("s", "1.1"))
    assert not detector.listed("s", Level.STORE, 10, folder=folder("s"))
    assert not detector.listed("s", Level.ROOT, 10, folder=DicomPath(()))
    assert not detector.listed("s", Level.INSTANCE, 10, folder=folder("s", "1.1", "1.1.1", "1.1.1.1.dcm"))
    assert not detector.listed("s", Level.SERIES, 10, folder=folder("s", "1.1", "1.1.1"))
    assert detector.listed("s", Level.STUDY, 10, folder=folder("s", "1.2"))


def test_the_same_folder_listed_again_counts_once() -> None:
    detector, _ = make_detector(trigger=3)
    same = folder("s", "1.1")
    assert [detector.listed("s", Level.STUDY, 10, folder=same) for _ in range(10)] == [False] * 10
    assert not detector.listed("s", Level.STUDY, 10, folder=folder("s", "1.2"))
    assert detector.listed("s", Level.STUDY, 10, folder=folder("s", "1.3"))


def test_without_a_folder_every_listing_counts() -> None:
    detector, _ = make_detector(trigger=3)
    assert [detector.listed("s", Level.SERIES, 10) for _ in range(3)] == [False, False, True]


def test_listings_spread_over_more_than_the_window_do_not_trigger() -> None:
    detector, clock = make_detector(trigger=3, window=5.0)
    results = []
    for i in range(10):
        results += list_folders(detector, "s", 1, start=i)
        clock.now += 2.6  # two listings per window at most
    assert results == [False] * 10
    # ...but three within the window do.
    clock.now += 5.0
    assert list_folders(detector, "s", 3, start=100) == [False, False, True]


def test_the_window_slides() -> None:
    detector, clock = make_detector(trigger=3, window=5.0)
    assert list_folders(detector, "s", 2) == [False, False]
    clock.now += 4.0
    assert list_folders(detector, "s", 1, start=2) == [True]  # three within 4 s


def test_one_walk_per_store_per_cooldown() -> None:
    detector, clock = make_detector(trigger=2, cooldown=60.0)
    assert list_folders(detector, "s", 2) == [False, True]
    clock.now += 59.0
    assert list_folders(detector, "s", 20, start=10) == [False] * 20
    clock.now += 1.0
    # Cooldown over: a walk needs a fresh trigger, not the listings made during the cooldown.
    assert list_folders(detector, "s", 2, start=50) == [False, True]


def test_stores_are_independent() -> None:
    detector, _ = make_detector(trigger=2)
    assert list_folders(detector, "a", 1) == [False]
    assert list_folders(detector, "b", 1) == [False]
    assert list_folders(detector, "a", 1, start=1) == [True]
    assert list_folders(detector, "b", 1, start=1) == [True]
    assert list_folders(detector, "a", 2, start=5) == [False, False]  # a cools down, alone


def test_large_or_unknown_stores_are_listed_folder_by_folder() -> None:
    detector, _ = make_detector(trigger=2, max_studies=1_000)
    assert list_folders(detector, "big", 5, hint=1_001) == [False] * 5
    assert list_folders(detector, "unknown", 5, hint=None) == [False] * 5
    assert list_folders(detector, "edge", 2, hint=1_000) == [False, True]
    # Once the hint is known and small enough, the recent listings count.
    assert list_folders(detector, "unknown", 1, start=10, hint=3) == [True]


def test_default_settings() -> None:
    detector = WalkDetector()
    assert (detector.trigger, detector.window, detector.max_studies, detector.cooldown) == (3, 5.0, 200_000, 60.0)
    assert list_folders(detector, "s", 3, hint=200_000) == [False, False, True]


@pytest.mark.parametrize(
    "kwargs", [{"trigger": 0}, {"window": 0.0}, {"cooldown": -1.0}, {"max_studies": -1}]
)
def test_invalid_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WalkDetector(**kwargs)  # type: ignore[arg-type]


def test_concurrent_listings_decide_one_walk() -> None:
    detector, _ = make_detector(trigger=3)
    results: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def lister(n: int) -> None:
        start.wait()
        mine = [
            detector.listed(store, Level.SERIES, 10, folder=folder(store, "1.1", f"1.1.{n}.{i}"))
            for i in range(50)
            for store in ("a", "b")
        ]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=lister, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 * 50 * 2
    assert results.count(True) == 2  # one per store: the clock stands still, the cooldown holds
