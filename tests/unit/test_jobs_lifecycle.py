"""
The job life cycle's transition table (L{jobworker.jobs.lifecycle}): every
legal path leads to ENDED, every other event is refused and changes nothing.
"""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from jobworker.jobs.lifecycle import TRANSITIONS, Event, IllegalTransition, LifeCycle, Phase

E, P = Event, Phase

# The paths the helper's contract allows, by how the job goes.
PATHS = {
    "direct job": [E.EXEC_EOF, E.HELPER_ENDED, E.OUTPUT_CLOSED, E.SETTLED],
    "isolated job": [E.STARTED, E.FINAL_LINE, E.STATUS_EOF, E.HELPER_ENDED, E.OUTPUT_CLOSED, E.SETTLED],
    "start failed": [E.FAILED_LINE, E.STATUS_EOF, E.HELPER_ENDED, E.OUTPUT_CLOSED, E.SETTLED],
    "helper died while starting": [E.HELPER_ENDED, E.STATUS_EOF, E.OUTPUT_CLOSED, E.SETTLED],
    # Twisted's order: every pipe's EOF, then the helper's end.
    "isolated helper died in set-up": [E.STATUS_EOF, E.HELPER_ENDED, E.OUTPUT_CLOSED, E.SETTLED],
    "direct start failed": [E.FAILED_LINE, E.EXEC_EOF, E.HELPER_ENDED, E.OUTPUT_CLOSED, E.SETTLED],
    "stopped at every turn": [E.STOP, E.STARTED, E.STOP, E.FINAL_LINE, E.HELPER_ENDED, E.STOP, E.OUTPUT_CLOSED, E.SETTLED],
    "stopped while failing": [E.FAILED_LINE, E.STOP, E.HELPER_ENDED, E.OUTPUT_CLOSED, E.SETTLED],
}


@pytest.mark.parametrize("path", PATHS.values(), ids=list(PATHS))
def test_each_path_of_the_contract_ends(path: list[Event]) -> None:
    life = LifeCycle()
    for event in path:
        life.fire(event)
    assert life.phase is P.ENDED


def simple_paths(phase: Phase, seen: tuple[Phase, ...] = ()) -> list[list[Event]]:
    """
    Every path from C{phase} to ENDED that visits no phase twice (self-loops
    are covered by L{test_self_loops}).
    """
    if phase is P.ENDED:
        return [[]]
    paths = []
    for (source, event), target in TRANSITIONS.items():
        if source is phase and target is not phase and target not in seen:
            paths += [[event, *rest] for rest in simple_paths(target, (*seen, phase))]
    return paths


def test_every_legal_path_reaches_ended_and_every_phase_has_one() -> None:
    every = simple_paths(P.STARTING)
    assert len(every) == 4  # started/exec EOF, failed, or the helper's end first
    for path in every:
        life = LifeCycle()
        for event in path:
            life.fire(event)
        assert life.phase is P.ENDED
    reached = {target for target in TRANSITIONS.values()} | {P.STARTING}
    assert reached == set(Phase)
    for phase in Phase:
        assert simple_paths(phase), phase


def test_self_loops() -> None:
    # Stops and informational status lines never move a job.
    for phase in (P.STARTING, P.RUNNING, P.START_FAILED, P.DRAINING):
        assert TRANSITIONS[phase, E.STOP] is phase
    assert TRANSITIONS[P.RUNNING, E.FINAL_LINE] is P.RUNNING
    # An isolated helper's status pipe at EOF with no word: not a start;
    # the helper's end, which Twisted reports after it, fails the start.
    assert TRANSITIONS[P.STARTING, E.STATUS_EOF] is P.STARTING
    assert TRANSITIONS[P.STARTING, E.EXEC_EOF] is P.RUNNING


@pytest.mark.parametrize(
    "phase, event",
    [
        (P.ENDED, event) for event in Event
    ]
    + [
        (P.SETTLING, E.STOP),  # the final state is decided: a stop comes too late
        (P.DRAINING, E.HELPER_ENDED),  # reaped once
        (P.RUNNING, E.STARTED),
        (P.RUNNING, E.EXEC_EOF),  # a direct job runs from its exec's EOF: there is no second
        (P.RUNNING, E.FAILED_LINE),  # the contract: failed or started, never both
        (P.START_FAILED, E.STARTED),
        (P.START_FAILED, E.FINAL_LINE),
        (P.STARTING, E.FINAL_LINE),  # an end line only after "started"
        (P.STARTING, E.OUTPUT_CLOSED),  # the output counts only once the helper ended
        (P.RUNNING, E.OUTPUT_CLOSED),
        (P.RUNNING, E.SETTLED),
        (P.DRAINING, E.SETTLED),
        (P.DRAINING, E.STARTED),
    ],
    ids=repr,
)
def test_illegal_transitions_are_refused(phase: Phase, event: Event) -> None:
    life = LifeCycle(phase)
    assert not life.allows(event)
    with pytest.raises(IllegalTransition) as refused:
        life.fire(event)
    assert (refused.value.phase, refused.value.event) == (phase, event)
    assert life.phase is phase


@given(st.lists(st.sampled_from(Event), max_size=30))
def test_any_sequence_moves_by_the_table_or_not_at_all(events: list[Event]) -> None:
    life = LifeCycle()
    for event in events:
        before = life.phase
        if (before, event) in TRANSITIONS:
            assert life.fire(event) is TRANSITIONS[before, event]
        else:
            with pytest.raises(IllegalTransition):
                life.fire(event)
            assert life.phase is before
