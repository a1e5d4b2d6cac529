"""Listing cache: TTL, negative entries, local overlay."""

from __future__ import annotations

from dicomfuse.core.paths import DicomPath
from dicomfuse.core.tree import Entry, ListingCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ttl_and_overlay():
    clock = Clock()
    cache = ListingCache(10, negative_ttl=2, overlay_ttl=30, clock=clock)
    folder = DicomPath.parse("/s")
    cache.put(folder, [("1.1", Entry(True)), ("1.2", Entry(True))])
    assert set(cache.get(folder)) == {"1.1", "1.2"}
    cache.note_added(folder, "1.3", Entry(True))
    cache.note_removed(folder, "1.1")
    assert set(cache.get(folder)) == {"1.2", "1.3"}
    clock.now = 11
    assert cache.get(folder) is None  # expired
    # A lagging server still lists 1.1 and lacks 1.3: the overlay wins until overlay_ttl.
    assert set(cache.put(folder, [("1.1", Entry(True)), ("1.2", Entry(True))])) == {"1.2", "1.3"}
    clock.now = 45
    assert set(cache.put(folder, [("1.1", Entry(True))])) == {"1.1"}


def test_lookup_negative_and_positive():
    clock = Clock()
    cache = ListingCache(10, negative_ttl=2, clock=clock)
    folder = DicomPath.parse("/s")
    assert cache.lookup(folder, "9.9") is None
    cache.remember_absent(folder.child("9.9"))
    assert cache.lookup(folder, "9.9") is False
    clock.now = 3
    assert cache.lookup(folder, "9.9") is None  # negative entries are brief
    cache.remember_present(folder, "9.9", Entry(True))
    assert cache.lookup(folder, "9.9") == Entry(True)
    clock.now = 14
    assert cache.lookup(folder, "9.9") is None


def test_size_learnt_updates_listing():
    cache = ListingCache(10)
    folder = DicomPath.parse("/s/1/2")
    cache.put(folder, [("3.dcm", Entry(False, None))])
    cache.update_size(folder, "3.dcm", 123)
    assert cache.get(folder)["3.dcm"] == Entry(False, 123)


def test_negative_cache_is_bounded():
    cache = ListingCache(10, max_negative=5)
    for i in range(20):
        cache.remember_absent(DicomPath.parse(f"/s/{i}"))
    assert len(cache._negative) == 5


def test_local_changes_answer_before_the_server_for_the_overlay_lifetime():
    clock = Clock()
    cache = ListingCache(10, overlay_ttl=30, clock=clock)
    series, store = DicomPath.parse("/s/1.1/1.2"), DicomPath.parse("/s")
    assert cache.local_change(series, "1.3.dcm") is None and not cache.files_added_below(store)
    cache.note_added(store, "1.1", Entry(True))
    assert not cache.files_added_below(store)  # a folder shown for a file: not content of its own
    cache.note_added(series, "1.3.dcm", Entry(False, 10))
    assert cache.local_change(series, "1.3.dcm") == Entry(False, 10)
    assert cache.files_added_below(store)
    cache.note_removed(series, "1.3.dcm")
    assert cache.local_change(series, "1.3.dcm") is False and not cache.files_added_below(store)
    cache.note_added(series, "1.3.dcm", Entry(False, 10))
    clock.now = 31
    assert cache.local_change(series, "1.3.dcm") is None and not cache.files_added_below(store)


def test_an_entry_the_mount_still_works_on_outlives_the_overlay():
    """A write-back upload may wait in its queue far longer than the overlay lasts (the server
    is down): what ``keep`` holds stays shown, the rest expires as before."""
    clock = Clock()
    held = {"1.3.dcm"}
    cache = ListingCache(10, overlay_ttl=30, clock=clock, keep=lambda folder, name: name in held)
    series = DicomPath.parse("/s/1.1/1.2")
    cache.note_added(series, "1.3.dcm", Entry(False, 10))
    cache.note_added(series, "1.4.dcm", Entry(False, 20))
    clock.now = 1000
    assert cache.put(series, []) == {"1.3.dcm": Entry(False, 10)}
    assert cache.local_change(series, "1.3.dcm") == Entry(False, 10)
    assert cache.local_change(series, "1.4.dcm") is None
    held.clear()
    assert cache.get(series) == {} and cache.local_change(series, "1.3.dcm") is None


def test_folders_added_for_uploads_go_with_the_last_of_them():
    """rm -r of a study just copied in: the study and series folders the overlay added for its
    files were listed, empty, for the overlay's 30 s. Once the mount removed the last file it
    added below them, the server's listing decides; a store the mount created stays."""
    clock = Clock()
    cache = ListingCache(ttl=2, overlay_ttl=30, clock=clock)
    root, store = DicomPath(()), DicomPath(("s",))
    study, series = store.child("1.2"), store.child("1.2").child("1.2.3")
    cache.note_added(root, "s", Entry(True))
    cache.note_added(store, "1.2", Entry(True))
    cache.note_added(study, "1.2.3", Entry(True))
    cache.note_added(series, "a.dcm", Entry(False, 10))
    cache.note_added(series, "b.dcm", Entry(False, 10))
    cache.note_removed(series, "a.dcm")
    added = lambda folder: cache.put(folder, [])  # noqa: E731 - what shows beside an empty listing
    assert added(store) == {"1.2": Entry(True)}  # b.dcm is still there
    cache.note_removed(series, "b.dcm")
    assert added(store) == {} and added(study) == {}
    assert added(root) == {"s": Entry(True)}
    assert cache.put(store, [("1.2", Entry(True))]) == {"1.2": Entry(True)}  # the server still has it: shown


def test_what_no_longer_counts_is_forgotten_in_a_long_run():
    """A mount runs for days. Expired listings of folders never listed again, and the overlay's
    entries for files copied in and removed (with their study and series folders), were kept
    for ever: 15,000 cp+rm cycles took RSS from 52 to 95 MiB, and every rm scanned them all."""
    clock = Clock()
    cache = ListingCache(ttl=2, overlay_ttl=30, clock=clock)
    store = DicomPath(("s",))
    for n in range(1000):
        study = store.child(f"1.{n}")
        series = study.child(f"1.{n}.1")
        cache.put(series, [("x.dcm", Entry(False, 1))])
        cache.note_added(store, study.name, Entry(True))
        cache.note_added(study, series.name, Entry(True))
        cache.note_added(series, "a.dcm", Entry(False, 10))
        cache.note_removed(series, "a.dcm")
        clock.now += 0.1
    clock.now += 31
    cache.put(store, [])
    assert len(cache._listings) == 1 and not cache._added and not cache._removed
    # What still counts stays: a file whose write-back upload is still queued.
    added = store.child("1.5").child("1.5.1")
    cache = ListingCache(ttl=2, overlay_ttl=30, clock=clock, keep=lambda folder, name: name == "b.dcm")
    cache.note_added(added, "b.dcm", Entry(False, 10))
    clock.now += 31
    cache.put(store, [])
    assert cache.lookup(added, "b.dcm") == Entry(False, 10)
