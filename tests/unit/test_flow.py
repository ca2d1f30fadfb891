"""
Tests for per-stream flow control (L{jobworker.protocol.flow}).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from jobworker.errors import ErrorCode, ProtocolError
from jobworker.protocol.flow import MAX_WINDOW, ReceiveWindow, SendWindow


@pytest.mark.parametrize("initial", [-1, MAX_WINDOW + 1, 2**32])
def test_send_window_refuses_initial_out_of_range(initial: int) -> None:
    with pytest.raises(ProtocolError) as caught:
        SendWindow(initial)
    assert caught.value.code is ErrorCode.FLOW_CONTROL_ERROR


@pytest.mark.parametrize("initial", [0, 1, MAX_WINDOW])
def test_send_window_accepts_initial_in_range(initial: int) -> None:
    assert SendWindow(initial).available == initial


def test_consume_up_to_the_window_then_refuse() -> None:
    window = SendWindow(10)
    window.consume(4)
    window.consume(6)
    assert window.available == 0
    with pytest.raises(ValueError) as caught:
        window.consume(1)
    # Sending past the window is our own bug, never the peer's.
    assert not isinstance(caught.value, ProtocolError)
    assert window.available == 0


def test_refused_consume_leaves_window_unchanged() -> None:
    window = SendWindow(10)
    with pytest.raises(ValueError):
        window.consume(11)
    assert window.available == 10
    window.consume(10)


@pytest.mark.parametrize("increment", [0, -1, -10])
def test_grant_must_be_positive(increment: int) -> None:
    window = SendWindow(10)
    with pytest.raises(ProtocolError) as caught:
        window.grant(increment)
    assert caught.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_grant_up_to_max_window_and_not_beyond() -> None:
    window = SendWindow(10)
    window.grant(MAX_WINDOW - 10)
    assert window.available == MAX_WINDOW
    with pytest.raises(ProtocolError) as caught:
        window.grant(1)
    assert caught.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_receive_window_refuses_more_than_granted() -> None:
    window = ReceiveWindow(10)
    window.received(10)
    with pytest.raises(ProtocolError) as caught:
        window.received(1)
    assert caught.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_credit_returns_in_batches_of_half_the_window() -> None:
    window = ReceiveWindow(100)
    window.received(100)
    assert window.consumed(30) == 0
    assert window.consumed(19) == 0
    assert window.consumed(1) == 50  # half the window: grant it all back
    assert window.outstanding == 50
    assert window.consumed(50) == 50
    assert window.outstanding == 100


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 10_000),
    steps=st.lists(st.tuples(st.booleans(), st.floats(0, 1)), max_size=60),
)
def test_sender_and_receiver_stay_in_step(size: int, steps: list[tuple[bool, float]]) -> None:
    """
    Driven together (every grant delivered), the sender's credit always
    equals what the receiver will accept, and a receiver that has processed
    everything it got always leaves the sender room to go on: flow control
    never deadlocks a stream.
    """
    sender = SendWindow(size)
    receiver = ReceiveWindow(size)
    unprocessed = 0
    for send, fraction in steps:
        if send:
            amount = round(sender.available * fraction)
            sender.consume(amount)
            receiver.received(amount)
            unprocessed += amount
        else:
            amount = round(unprocessed * fraction)
            unprocessed -= amount
            increment = receiver.consumed(amount)
            if increment:
                sender.grant(increment)
        assert sender.available == receiver.outstanding
        assert 0 <= sender.available <= size
    increment = receiver.consumed(unprocessed)
    if increment:
        sender.grant(increment)
    assert sender.available == receiver.outstanding
    assert sender.available * 2 >= size
