"""The baton: one handler runs Python at a time, waits hand it on, locks never deadlock."""

from __future__ import annotations

import threading

from csi_driver import baton


def run_thread(target: object) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


def test_held_is_exclusive_and_reentrant() -> None:
    inside = threading.Event()
    leave = threading.Event()
    second_in = threading.Event()

    def first() -> None:
        with baton.held(), baton.held():  # a holder may enter again
            inside.set()
            leave.wait(5)

    def second() -> None:
        with baton.held():
            second_in.set()

    a = run_thread(first)
    assert inside.wait(5)
    b = run_thread(second)
    assert not second_in.wait(0.2)  # waits while the first holds it
    leave.set()
    assert second_in.wait(5)
    a.join(5)
    b.join(5)


def test_blocking_lets_another_handler_run() -> None:
    ran = threading.Event()

    def other() -> None:
        with baton.held():
            ran.set()

    with baton.held():
        t = run_thread(other)
        with baton.blocking():  # e.g. waiting for mkfs
            assert ran.wait(5)
    t.join(5)


def test_blocking_outside_a_handler_is_a_no_op() -> None:
    with baton.blocking():
        pass
    with baton.held():
        pass  # still free


def test_waiting_for_a_lock_hands_the_baton_on() -> None:
    """A holds a lock across a blocking call; B, holding the baton, wants the lock. B
    must give the baton up while it waits, or A can never come back for it."""
    lock = threading.Lock()
    a_in_call = threading.Event()
    b_waiting = threading.Event()
    done = []

    def a() -> None:
        with baton.held(), baton.locked(lock):
            with baton.blocking():
                a_in_call.set()
                b_waiting.wait(5)
            done.append("a")

    def b() -> None:
        assert a_in_call.wait(5)
        with baton.held():
            b_waiting.set()
            with baton.locked(lock):
                done.append("b")

    ta, tb = run_thread(a), run_thread(b)
    ta.join(5)
    tb.join(5)
    assert not ta.is_alive() and not tb.is_alive(), "deadlock"
    assert done == ["a", "b"]
