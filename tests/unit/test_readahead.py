"""Read-ahead decisions: what is fetched ahead, when it stops, what is cancelled."""

from __future__ import annotations

from dicomfuse.core.paths import DicomPath
from dicomfuse.core.readahead import ReadAhead

FOLDER = DicomPath.parse("/store/1.2/1.3")
NAMES = [f"1.4.{i}.dcm" for i in range(40)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self, room: int = 10_000) -> None:
        self.fetched: list[str] = []
        self.cancelled: list[str] = []
        self.room = room
        self.listings = 0

    def names_of(self, folder: DicomPath) -> list[str]:
        self.listings += 1
        return NAMES

    def fetch(self, path: DicomPath) -> bool:
        if self.room <= 0:
            return False
        self.room -= 1
        self.fetched.append(path.name)
        return True

    def cancel(self, path: DicomPath) -> bool:
        self.cancelled.append(path.name)
        return True


def make(window: int = 4, room: int = 10_000) -> tuple[ReadAhead, Recorder, Clock]:
    rec, clock = Recorder(room), Clock()
    return ReadAhead(window, rec.names_of, rec.fetch, rec.cancel, idle=10, clock=clock), rec, clock


def open_(ra: ReadAhead, i: int) -> None:
    ra.opened(FOLDER.child(NAMES[i]))


def test_one_open_fetches_nothing_two_in_order_keep_a_window_ahead():
    ra, rec, _ = make(window=4)
    open_(ra, 0)
    assert rec.fetched == []
    open_(ra, 1)
    assert rec.fetched == NAMES[2:6]
    open_(ra, 2)
    assert rec.fetched == NAMES[2:7], "one more each time, never twice the same"
    for i in range(3, 10):
        open_(ra, i)
    assert rec.fetched == NAMES[2:14]
    assert rec.listings == 1, "the folder order is listed once"


def test_parallel_readers_a_step_or_two_ahead_keep_the_pattern():
    ra, rec, _ = make(window=3)
    for i in (0, 2, 1, 4, 3, 6):
        open_(ra, i)
    assert set(NAMES[3:10]) <= set(rec.fetched)
    assert rec.cancelled == []


def test_random_access_stops_it_and_cancels_what_was_queued_elsewhere():
    ra, rec, _ = make(window=4)
    open_(ra, 0)
    open_(ra, 1)  # NAMES[2:6] scheduled
    open_(ra, 30)
    assert sorted(rec.cancelled) == sorted(NAMES[2:6])
    fetched = len(rec.fetched)
    open_(ra, 12)
    assert len(rec.fetched) == fetched, "no pattern, no read-ahead"


def test_an_idle_folder_gets_its_queue_cancelled():
    ra, rec, clock = make(window=4)
    open_(ra, 0)
    open_(ra, 1)
    clock.now = 11
    ra.opened(DicomPath.parse("/store/9.9/9.8/9.7.dcm"))  # activity elsewhere sweeps idle folders
    assert sorted(rec.cancelled) == sorted(NAMES[2:6])


def test_a_reader_that_stopped_gets_its_queue_cancelled_with_no_further_open():
    """A reader read two files in order, then opened nothing more: what it queued was fetched
    all the same (27 downloads after it stopped, the last 22 s later), as only an open swept."""
    ra, rec, clock = make(window=4)
    open_(ra, 0)
    open_(ra, 1)
    clock.now = 5
    ra.sweep()
    assert rec.cancelled == []  # not idle yet
    clock.now = 11
    ra.sweep()
    assert sorted(rec.cancelled) == sorted(NAMES[2:6])
    ra.close()


def test_the_sweep_timer_runs_while_something_is_queued():
    from tests.mounting import wait_for

    rec = Recorder()
    ra = ReadAhead(4, rec.names_of, rec.fetch, rec.cancel, idle=0.05)  # the real clock
    open_(ra, 0)
    open_(ra, 1)
    wait_for(lambda: sorted(rec.cancelled) == sorted(NAMES[2:6]), 10, what="the idle sweep")
    ra.close()
    assert ra._timer is None


def test_no_room_stops_for_now_and_resumes_from_there():
    ra, rec, _ = make(window=4, room=2)
    open_(ra, 0)
    open_(ra, 1)
    assert rec.fetched == NAMES[2:4]
    rec.room = 100
    open_(ra, 2)
    assert rec.fetched == NAMES[2:7], "the files refused for room are fetched at the next open"


def test_window_zero_turns_it_off():
    ra, rec, _ = make(window=0)
    for i in range(5):
        open_(ra, i)
    assert rec.fetched == [] and rec.listings == 0


def test_the_end_of_the_folder_is_not_passed():
    ra, rec, _ = make(window=8)
    open_(ra, 36)
    open_(ra, 37)
    assert rec.fetched == NAMES[38:40]
