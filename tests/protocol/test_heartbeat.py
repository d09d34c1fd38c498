"""The heartbeat schedule on a fake clock: pings every interval, death exactly at the timeout."""

from relay_protocol.heartbeat import Heartbeat
from relay_protocol.limits import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, SEND_TIMEOUT


def test_pings_every_interval_while_the_peer_talks() -> None:
    beat = Heartbeat(now=0.0)
    first = beat.check(0.0)
    assert (first.dead, first.ping, first.wait) == (False, False, HEARTBEAT_INTERVAL)
    pings = []
    now = 0.0
    while now < 10 * HEARTBEAT_INTERVAL:
        beat.seen(now)  # the peer keeps answering
        step = beat.check(now)
        assert not step.dead
        if step.ping:
            pings.append(now)
        now += step.wait
    assert pings == [HEARTBEAT_INTERVAL * i for i in range(1, 10)]


def test_a_silent_peer_is_dead_exactly_at_the_timeout() -> None:
    beat = Heartbeat(now=100.0)
    now = 100.0
    checks = 0
    while not (step := beat.check(now)).dead:
        now += step.wait
        checks += 1
    assert now == 100.0 + HEARTBEAT_TIMEOUT  # not a whole interval later
    assert checks == HEARTBEAT_TIMEOUT // HEARTBEAT_INTERVAL


def test_any_frame_postpones_death() -> None:
    beat = Heartbeat(now=0.0)
    beat.seen(HEARTBEAT_TIMEOUT - 1)
    assert not beat.check(HEARTBEAT_TIMEOUT + 1).dead
    assert beat.check(2 * HEARTBEAT_TIMEOUT - 1).dead


# -- a peer that stops reading: the oldest frame waiting to be sent ---------------


def test_a_peer_that_talks_but_never_reads_is_dead_at_the_send_timeout() -> None:
    # The peer sends a frame every second (as the hostile agent of the e2e test
    # does), so silence never kills it; a frame queued at 5.0 is never taken.
    beat = Heartbeat(now=0.0)
    queued_at = 5.0
    now = queued_at
    checks = 0
    while not (step := beat.check(now, oldest_send=queued_at)).dead:
        assert not step.ping  # a frame is already on its way: no PING queues behind it
        now = min(now + step.wait, float(int(now) + 1))
        beat.seen(now)
        checks += 1
    assert step.stuck
    assert now == queued_at + SEND_TIMEOUT
    assert checks >= SEND_TIMEOUT  # it kept talking all along


def test_a_check_wakes_up_for_the_send_deadline() -> None:
    beat = Heartbeat(now=0.0)
    beat.seen(20.0)
    # Sleeping exactly the waits it asks for, it is declared stuck at the deadline, not later.
    now = 25.0
    while not (step := beat.check(now, oldest_send=24.0)).dead:
        beat.seen(now)
        now += step.wait
    assert (step.stuck, now) == (True, 24.0 + SEND_TIMEOUT)


def test_frames_that_leave_in_time_never_kill() -> None:
    beat = Heartbeat(now=0.0)
    now = 0.0
    for i in range(100):
        beat.seen(now)
        # Something is always queued, each frame taken just before the bound.
        step = beat.check(now, oldest_send=now - SEND_TIMEOUT + 0.5)
        assert not step.dead, i
        now += 1.0


def test_no_ping_while_a_send_is_pending_then_pings_again() -> None:
    beat = Heartbeat(now=0.0)
    assert not beat.check(HEARTBEAT_INTERVAL, oldest_send=HEARTBEAT_INTERVAL - 1).ping
    beat.seen(HEARTBEAT_INTERVAL)
    later = 2 * HEARTBEAT_INTERVAL
    assert beat.check(later, oldest_send=None).ping  # the outbox emptied: heartbeat resumes


def test_silence_is_still_dead_without_stuck() -> None:
    beat = Heartbeat(now=0.0)
    step = beat.check(HEARTBEAT_TIMEOUT)
    assert (step.dead, step.stuck) == (True, False)


def test_another_interval_scales_pings_and_silence_but_not_the_send_timeout() -> None:
    # --heartbeat-interval 5: a PING every 5 s and dead after 15 s of silence, but a frame
    # may still wait SEND_TIMEOUT to be sent: how long a slow link takes to drain what is
    # queued for it does not change with the interval.
    beat = Heartbeat(now=0.0, interval=5.0)
    assert beat.silence_timeout == 15.0
    first = beat.check(0.0)
    assert (first.ping, first.wait) == (False, 5.0)
    assert beat.check(5.0).ping
    now = 5.0
    while not (step := beat.check(now)).dead:
        now += step.wait
    assert now == 15.0 and not step.stuck
    queued = Heartbeat(now=0.0, interval=5.0)
    now = 1.0
    while not (step := queued.check(now, oldest_send=1.0)).dead:
        now += step.wait
    assert step.stuck and now == 1.0 + SEND_TIMEOUT


def test_silence_is_not_counted_while_frames_wait_to_be_sent() -> None:
    # A slow link: our frames wait for 40 s (each taken before SEND_TIMEOUT), the peer says
    # nothing all along (no PING of ours reached it to answer). Not dead: before, a silent
    # peer was dead three intervals after its last frame even then (found by a review:
    # a short interval took a busy slow link for a dead one).
    beat = Heartbeat(now=0.0, interval=5.0)
    now = 0.0
    while now < 40.0:
        step = beat.check(now, oldest_send=now - 10.0)
        assert not step.dead and not step.ping, now
        now += step.wait
    # The queue empties at 40 s: the silence clock runs again from the last check.
    step = beat.check(now)
    assert not step.dead and step.ping
    while not (step := beat.check(now)).dead:
        now += step.wait
    assert not step.stuck and 40.0 + 10.0 <= now <= 40.0 + 15.0
