"""FlowControl: reading pauses for named reasons; linked peers pause each other."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from support.transport import FakeTransport

from proxy.flow import (
    BUFFER,
    CONNECTING,
    PEER,
    PIPELINE,
    REFUSED,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    FlowControl,
    Forwarding,
)


class CountingTransport(FakeTransport):
    """Counts how often reading is paused and resumed (a real transport warns or
    raises on some repeats, so the count is what a test looks at)."""

    def __init__(self) -> None:
        super().__init__()
        self.pauses = 0
        self.resumes = 0

    def pause_reading(self) -> None:
        self.pauses += 1
        super().pause_reading()

    def resume_reading(self) -> None:
        self.resumes += 1
        super().resume_reading()


def make() -> tuple[FlowControl, CountingTransport]:
    transport = CountingTransport()
    return FlowControl(transport), transport


# --- reasons --------------------------------------------------------------------------


def test_new_flow_is_reading_and_sets_the_write_buffer_limits() -> None:
    flow, transport = make()
    assert not flow.read_paused
    assert flow.reasons == 0
    assert not flow.write_paused
    assert flow.peer is None
    assert (transport.high_water, transport.low_water) == (WRITE_HIGH_WATER, WRITE_LOW_WATER)
    assert transport.get_write_buffer_limits() == (64 * 1024, 256 * 1024)
    assert (transport.pauses, transport.resumes) == (0, 0)


def test_pause_tells_the_transport_once() -> None:
    flow, transport = make()
    flow.pause(BUFFER)
    assert transport.reading_paused
    assert flow.read_paused
    flow.pause(PIPELINE)
    flow.pause(BUFFER)
    assert transport.pauses == 1


def test_reading_resumes_only_when_the_last_reason_goes() -> None:
    flow, transport = make()
    for reason in (BUFFER, PIPELINE, CONNECTING):
        flow.pause(reason)
    flow.resume(BUFFER)
    flow.resume(CONNECTING)
    assert transport.reading_paused
    assert flow.read_paused
    assert transport.resumes == 0
    flow.resume(PIPELINE)
    assert not transport.reading_paused
    assert not flow.read_paused
    assert (transport.pauses, transport.resumes) == (1, 1)


def test_pause_and_resume_twice_are_harmless() -> None:
    flow, transport = make()
    flow.pause(REFUSED)
    flow.pause(REFUSED)
    flow.resume(REFUSED)
    flow.resume(REFUSED)
    assert not transport.reading_paused
    assert (transport.pauses, transport.resumes) == (1, 1)
    assert flow.reasons == 0


def test_resume_of_a_reason_never_paused_does_nothing() -> None:
    flow, transport = make()
    flow.resume(BUFFER)
    assert (transport.pauses, transport.resumes) == (0, 0)
    flow.pause(PIPELINE)
    flow.resume(BUFFER)
    assert flow.reasons == PIPELINE
    assert transport.reading_paused
    assert transport.resumes == 0


def test_a_closing_transport_is_never_told() -> None:
    flow, transport = make()
    transport.close()
    flow.pause(BUFFER)
    flow.repause()
    flow.resume(BUFFER)
    assert (transport.pauses, transport.resumes) == (0, 0)


def test_a_transport_closed_while_paused_is_not_resumed() -> None:
    flow, transport = make()
    flow.pause(CONNECTING)
    transport.close()
    flow.resume(CONNECTING)
    assert not flow.read_paused
    assert (transport.pauses, transport.resumes) == (1, 0)


def test_repause_tells_the_transport_again_only_while_a_reason_holds() -> None:
    flow, transport = make()
    flow.repause()
    assert transport.pauses == 0
    flow.pause(BUFFER)
    transport.reading_paused = False  # as if a read under way got through
    flow.repause()
    assert transport.reading_paused
    assert transport.pauses == 2
    flow.resume(BUFFER)
    flow.repause()
    assert transport.pauses == 2
    assert not transport.reading_paused


@pytest.mark.parametrize(
    ("reasons", "text"),
    [
        ((), "<FlowControl paused=- write_paused=False>"),
        ((BUFFER, PEER), "<FlowControl paused=peer,buffer write_paused=False>"),
        (
            (REFUSED, CONNECTING, BUFFER, PIPELINE, PEER),
            "<FlowControl paused=peer,pipeline,buffer,connecting,refused write_paused=False>",
        ),
    ],
)
def test_repr(reasons: tuple[int, ...], text: str) -> None:
    flow, _ = make()
    for reason in reasons:
        flow.pause(reason)
    assert repr(flow) == text


def test_repr_write_paused() -> None:
    flow, _ = make()
    flow.writing_paused()
    assert repr(flow) == "<FlowControl paused=- write_paused=True>"


# --- linked peers -----------------------------------------------------------------------


def test_full_write_buffer_pauses_the_peers_reading() -> None:
    a, ta = make()
    b, tb = make()
    a.link(b)
    assert a.peer is b
    assert b.peer is a
    assert not ta.reading_paused
    assert not tb.reading_paused
    a.writing_paused()
    assert a.write_paused
    assert b.reasons == PEER
    assert tb.reading_paused
    assert not ta.reading_paused
    a.writing_resumed()
    assert not a.write_paused
    assert b.reasons == 0
    assert not tb.reading_paused
    b.writing_paused()
    assert a.reasons == PEER
    assert ta.reading_paused
    b.writing_resumed()
    assert not ta.reading_paused


@pytest.mark.parametrize("full_side", ["self", "peer"])
def test_a_link_made_while_one_side_is_full_starts_the_other_paused(full_side: str) -> None:
    a, ta = make()
    b, tb = make()
    full, other, other_transport = (a, b, tb) if full_side == "self" else (b, a, ta)
    full.writing_paused()  # not linked yet: nobody to tell
    assert not ta.reading_paused
    assert not tb.reading_paused
    a.link(b)
    assert other.reasons == PEER
    assert other_transport.reading_paused
    assert full.reasons == 0
    full.writing_resumed()
    assert not other_transport.reading_paused


def test_a_link_made_while_both_sides_are_full_pauses_both() -> None:
    a, ta = make()
    b, tb = make()
    a.writing_paused()
    b.writing_paused()
    a.link(b)
    assert a.reasons == b.reasons == PEER
    assert ta.reading_paused
    assert tb.reading_paused


def test_unlink_resumes_both_and_forgets_the_peer() -> None:
    a, ta = make()
    b, tb = make()
    a.link(b)
    a.writing_paused()
    b.writing_paused()
    a.unlink()
    assert a.peer is None
    assert b.peer is None
    assert a.reasons == b.reasons == 0
    assert not ta.reading_paused
    assert not tb.reading_paused
    # Later buffer changes touch nobody.
    a.writing_resumed()
    a.writing_paused()
    b.writing_resumed()
    b.writing_paused()
    assert a.reasons == b.reasons == 0
    assert not ta.reading_paused
    assert not tb.reading_paused
    assert a.write_paused
    assert b.write_paused


def test_unlink_from_either_side_and_twice() -> None:
    a, ta = make()
    b, tb = make()
    a.link(b)
    b.writing_paused()
    b.unlink()
    assert a.peer is None
    assert b.peer is None
    assert not ta.reading_paused
    b.unlink()
    a.unlink()
    assert (ta.pauses, ta.resumes, tb.pauses, tb.resumes) == (1, 1, 0, 0)


def test_unlink_keeps_other_reasons() -> None:
    a, ta = make()
    b, _ = make()
    a.link(b)
    b.writing_paused()
    a.pause(BUFFER)
    a.unlink()
    assert a.reasons == BUFFER
    assert ta.reading_paused
    a.resume(BUFFER)
    assert not ta.reading_paused


def test_peer_combined_with_other_reasons() -> None:
    a, ta = make()
    b, _ = make()
    a.link(b)
    a.pause(BUFFER)
    b.writing_paused()
    a.pause(PIPELINE)
    assert a.reasons == PEER | BUFFER | PIPELINE
    assert repr(a) == "<FlowControl paused=peer,pipeline,buffer write_paused=False>"
    b.writing_resumed()
    assert a.reasons == BUFFER | PIPELINE
    assert ta.reading_paused
    a.resume(BUFFER)
    assert ta.reading_paused
    b.writing_paused()
    a.resume(PIPELINE)
    assert ta.reading_paused  # PEER still holds
    b.writing_resumed()
    assert not ta.reading_paused
    assert (ta.pauses, ta.resumes) == (1, 1)


def test_peer_then_other_reason_then_peer_goes() -> None:
    a, ta = make()
    b, _ = make()
    a.link(b)
    b.writing_paused()
    a.pause(BUFFER)
    b.writing_resumed()
    assert a.reasons == BUFFER
    assert ta.reading_paused
    a.resume(BUFFER)
    assert not ta.reading_paused


# --- Forwarding -------------------------------------------------------------------------


def side() -> tuple[Forwarding, FakeTransport]:
    """A Forwarding protocol with its flow (compiled classes take no interpreted subclass)."""
    protocol = Forwarding()
    transport = FakeTransport(protocol)
    protocol.flow = FlowControl(transport)
    return protocol, transport


def test_forwarding_pause_and_resume_writing_reach_the_flow() -> None:
    (down, down_t), (up, up_t) = side(), side()
    down.flow.link(up.flow)
    up.pause_writing()  # asyncio: the upstream write buffer went over its high water
    assert up.flow.write_paused
    assert down.flow.reasons == PEER
    assert down_t.reading_paused
    assert not up_t.reading_paused
    up.resume_writing()
    assert not up.flow.write_paused
    assert not down_t.reading_paused
    down.pause_writing()
    assert up_t.reading_paused
    down.resume_writing()
    assert not up_t.reading_paused


# --- any sequence -------------------------------------------------------------------------

OTHER_REASONS = (PIPELINE, BUFFER, CONNECTING, REFUSED)


class TwoFlows(RuleBasedStateMachine):
    """Two FlowControls under any sequence of calls: each transport reads iff its flow
    has no reason, and PEER holds on a side iff it is linked and its peer's buffer is
    full. A transport that closes is never told again."""

    def __init__(self) -> None:
        super().__init__()
        self.transports = [CountingTransport(), CountingTransport()]
        self.flows = [FlowControl(t) for t in self.transports]
        self.held: list[set[int]] = [set(), set()]  # the reasons other than PEER
        self.linked = False
        self.told_at_close: list[tuple[int, int] | None] = [None, None]
        self.repauses = [0, 0]  # pauses told again by repause()

    sides = st.sampled_from([0, 1])

    @rule(side=sides, reason=st.sampled_from(OTHER_REASONS))
    def pause(self, side: int, reason: int) -> None:
        self.flows[side].pause(reason)
        self.held[side].add(reason)

    @rule(side=sides, reason=st.sampled_from(OTHER_REASONS))
    def resume(self, side: int, reason: int) -> None:
        self.flows[side].resume(reason)
        self.held[side].discard(reason)

    @rule(side=sides)
    def repause(self, side: int) -> None:
        flow = self.flows[side]
        if flow.read_paused and not self.transports[side].closed:
            self.repauses[side] += 1
        flow.repause()

    @rule(side=sides)
    def link(self, side: int) -> None:
        self.flows[side].link(self.flows[1 - side])
        self.linked = True

    @rule(side=sides)
    def unlink(self, side: int) -> None:
        self.flows[side].unlink()
        self.linked = False

    @rule(side=sides)
    def writing_paused(self, side: int) -> None:
        self.flows[side].writing_paused()

    @rule(side=sides)
    def writing_resumed(self, side: int) -> None:
        self.flows[side].writing_resumed()

    @precondition(lambda self: None in self.told_at_close)
    @rule(side=sides)
    def close(self, side: int) -> None:
        transport = self.transports[side]
        if not transport.closed:
            transport.close()
            self.told_at_close[side] = (transport.pauses, transport.resumes)

    @invariant()
    def reading_follows_the_reasons(self) -> None:
        for side in (0, 1):
            flow, transport = self.flows[side], self.transports[side]
            peer = self.flows[1 - side]
            peer_full = self.linked and peer.write_paused
            assert bool(flow.reasons & PEER) == peer_full, flow
            expected = sum(self.held[side]) | (PEER if peer_full else 0)
            assert flow.reasons == expected
            assert flow.read_paused == (expected != 0)
            assert (flow.peer is peer) == self.linked
            told = self.told_at_close[side]
            if told is None:
                assert transport.reading_paused == flow.read_paused
                # Told only on a change (and on each repause while paused).
                pauses = transport.pauses - self.repauses[side]
                assert pauses - transport.resumes == int(flow.read_paused)
            else:
                assert (transport.pauses, transport.resumes) == told


TwoFlows.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_two_flows = TwoFlows.TestCase
