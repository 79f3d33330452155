"""The placement policy (serving/placement.py): slots leased together, the bounded FIFO queue, expiry, drains."""

from __future__ import annotations

import asyncio

import pytest

from livetalk_ray.config import load_config
from livetalk_ray.serving.placement import QUEUE_POLL_TTL_S, REPLICA_TTL_S, Placement, PlacementBook


def book_with(denoisers: dict[str, int], decoders: dict[str, int], max_queue: int = 2) -> PlacementBook:
    book = PlacementBook(max_queue=max_queue, lease_ttl_s=15.0)
    for name, slots in denoisers.items():
        book.report("Denoiser", name, slots, False, now=0.0)
    for name, slots in decoders.items():
        book.report("VAEDecoder", name, slots, False, now=0.0)
    return book


def test_sessions_get_a_denoiser_and_a_decoder_slot_together_least_loaded_first():
    book = book_with({"d1": 2, "d2": 2}, {"v1": 4})
    leases = [book.admit(f"s{i}", "ingress", now=1.0)["lease"] for i in range(4)]
    assert sorted(lease["Denoiser"] for lease in leases) == ["d1", "d1", "d2", "d2"]  # never 3 on one
    assert {lease["VAEDecoder"] for lease in leases} == {"v1"}
    assert book.admit("s0", "ingress", now=1.0)["lease"] == leases[0]  # asking again changes nothing


def test_a_full_decoder_queues_the_session_even_with_denoiser_slots_free():
    book = book_with({"d1": 4}, {"v1": 1})
    assert "lease" in book.admit("a", "i", now=1.0)
    assert book.admit("b", "i", now=1.0) == {"queued": {"position": 1, "estimated_wait_s": 75.0}}
    assert book.load("Denoiser") == {"d1": 1}  # the queued session holds no denoiser slot either


def test_the_queue_is_fifo_bounded_and_admits_when_a_slot_frees():
    book = book_with({"d1": 1}, {"v1": 1}, max_queue=2)
    book.admit("a", "i", now=1.0)
    assert book.admit("b", "i", now=1.0)["queued"]["position"] == 1
    assert book.admit("c", "i", now=1.0)["queued"]["position"] == 2
    assert "full" in book.admit("d", "i", now=1.0)  # the queue holds 2
    assert book.admit("c", "i", now=2.0)["queued"]["position"] == 2  # asking again keeps the place
    book.release("a", now=3.0)
    assert book.admit("c", "i", now=3.1)["queued"]["position"] == 1
    assert "lease" in book.admit("b", "i", now=3.1)  # b was first: it got a's slot


def test_a_new_replica_admits_the_queue():
    book = book_with({"d1": 1}, {"v1": 2})
    book.admit("a", "i", now=1.0)
    book.admit("b", "i", now=1.0)
    book.report("Denoiser", "d2", 1, False, now=2.0)
    assert book.admit("b", "i", now=2.0)["lease"]["Denoiser"] == "d2"


def test_silent_replicas_unrenewed_leases_and_unpolled_queue_entries_expire():
    book = book_with({"d1": 1, "d2": 1}, {"v1": 1})
    book.admit("a", "i", now=1.0)  # holds v1's only slot
    book.admit("b", "i", now=1.0)
    later = 1.0 + max(REPLICA_TTL_S, QUEUE_POLL_TTL_S) + 0.1
    book.renew("i", {"a": {"Denoiser": "d1", "VAEDecoder": "v1"}}, now=later)
    book.report("Denoiser", "d1", 1, False, now=later)
    book.report("VAEDecoder", "v1", 1, False, now=later)
    book.expire(now=later)
    assert set(book.replicas["Denoiser"]) == {"d1"}  # d2 stopped reporting
    assert book.queue == {}  # b stopped asking for its place
    book.expire(now=later + 15.1)  # nobody renewed a's lease for lease_ttl_s (its Ingress died)
    assert book.leases == {}


def test_a_renewal_rebuilds_the_leases_a_restarted_placement_forgot():
    book = book_with({"d1": 2}, {"v1": 2})
    book.renew("i", {"a": {"Denoiser": "d1", "VAEDecoder": "v1"}}, now=1.0)
    assert book.load("Denoiser") == {"d1": 1}
    assert book.admit("a", "i", now=1.0) == {"lease": {"Denoiser": "d1", "VAEDecoder": "v1"}}


def test_a_drain_moves_sessions_to_replicas_with_free_slots_and_takes_no_new_ones():
    book = book_with({"d1": 2, "d2": 2, "d3": 2}, {"v1": 8})
    for i in range(4):
        book.admit(f"s{i}", "i", now=1.0)  # d1, d2, d3, then one of them a second
    on_d1 = [sid for sid, lease in book.leases.items() if lease.replicas["Denoiser"] == "d1"]
    moves = book.drain("Denoiser", "d1", now=2.0)
    assert [sid for sid, _ in moves] == on_d1 and all(target in ("d2", "d3") for _, target in moves)
    assert all(book.where(sid, "Denoiser") == ("d1", True) for sid in on_d1)  # moving, not yet moved
    for sid, target in moves:
        book.moved(sid, "Denoiser", target)
    assert book.load("Denoiser")["d1"] == 0 and book.free_slots("Denoiser") == 0
    assert "queued" in book.admit("new", "i", now=2.0)  # the draining replica's slots are gone


def test_a_drain_with_no_other_replica_returns_no_target_and_reassign_avoids_the_lost_one():
    book = book_with({"d1": 2}, {"v1": 2})
    book.admit("a", "i", now=1.0)
    assert book.drain("Denoiser", "d1", now=2.0) == [("a", None)]
    book.report("Denoiser", "d2", 1, False, now=3.0)
    assert book.reassign("a", "Denoiser", avoid="d1", now=3.0) == "d2"


def test_relocate_answers_with_the_new_replica_once_the_move_ends():
    cfg = load_config("toy").model_dump(mode="json")

    async def scenario():
        placement = Placement(cfg)
        for stage, name in (("Denoiser", "d1"), ("Denoiser", "d2"), ("VAEDecoder", "v1")):
            await placement.report(stage, name, 2)
        lease = (await placement.admit("s", "i"))["lease"]
        lost = lease["Denoiser"]
        asking = asyncio.create_task(placement.relocate("s", "Denoiser", lost, wait_s=2.0))
        await asyncio.sleep(0.05)  # the driver asked before the drain began: it waits for it
        [(sid, target)] = await placement.drain("Denoiser", lost)
        await asyncio.sleep(0.05)
        assert not asking.done()  # moving: not an answer yet
        await placement.moved(sid, "Denoiser", target)
        assert await asyncio.wait_for(asking, 1.0) == target
        # A replica that neither drains nor answers: no move comes, so the driver re-primes.
        assert await placement.relocate("s", "Denoiser", target, wait_s=0.1) is None

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("preset", "device", "decoder", "slots"),
    [("toy", "cpu", "full", (4, 2)), ("toy", "cpu", "tiny", (4, 4)), ("wan-1.3b", "cuda:1", "full", (1, 2))],
)
def test_slots_per_replica_come_from_the_preset_device_and_decoder_unless_set(preset, device, decoder, slots):
    assert load_config(preset).serve.admission.slots(preset, device, decoder) == slots
    admission = load_config(preset, overrides=["serve.admission.decoder_slots=5"]).serve.admission
    assert admission.slots(preset, device, decoder) == (slots[0], 5)
