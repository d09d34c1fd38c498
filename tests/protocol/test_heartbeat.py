"""The heartbeat schedule on a fake clock: pings every interval, death exactly at the timeout."""

from relay_protocol.heartbeat import Heartbeat
from relay_protocol.limits import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT


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
