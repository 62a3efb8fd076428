"""Which member a stray member copies its weights from, and never from one that is accused."""

from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging.accusations import make_accusation
from swarm.averaging.statements import sign_statement
from swarm.training.bans import accused_in
from swarm.training.collaboration import Collaboration, MemberProgress

OURS = (1.0, 2.0, 3.0, 10.0)  # a fingerprint: values, then the scale its tolerance is relative to
OTHER = (5.0, 6.0, 7.0, 10.0)


def collaboration(members, suspected=frozenset(), banned=frozenset(), step=3, fingerprint=OURS):
    async def resync(peer_id: str) -> None:
        raise AssertionError("not called by reference()")

    async def nothing(*_):
        return None

    return Collaboration(
        "test",
        "me",
        8,
        progress=lambda: (step, 0),
        members=lambda: list(members),
        take=nothing,
        apply=nothing,
        averager=None,
        averaging_timeout=5.0,
        own_fingerprint=lambda: list(fingerprint),
        resync=resync,
        banned=lambda: set(banned),
        suspected=lambda: set(suspected),
    )


def test_the_furthest_member_ahead_is_the_donor_unless_it_is_accused_or_banned():
    members = [
        MemberProgress("a", 4, 0, OURS),
        MemberProgress("b", 5, 0, OTHER),
        MemberProgress("c", 3, 0, OURS),
    ]
    assert collaboration(members).reference().peer_id == "b"
    assert collaboration(members, suspected={"b"}).reference().peer_id == "a"
    assert collaboration(members, banned={"b"}).reference().peer_id == "a"
    assert collaboration(members, suspected={"a", "b"}).reference() is None  # c agrees with us


def test_an_accused_member_does_not_count_towards_the_majority_at_our_step():
    # at our step, three members hold other weights than ours and one holds ours: 3 against 2
    members = [
        MemberProgress("x", 3, 0, OTHER),
        MemberProgress("y", 3, 0, OTHER),
        MemberProgress("w", 3, 0, OTHER),
        MemberProgress("z", 3, 0, OURS),
    ]
    assert collaboration(members).reference().peer_id == "w"
    # one of the three is accused: 2 against 2, and the tie goes to the smallest peer id ("me")
    assert collaboration(members, suspected={"y"}).reference() is None
    # all three are accused: nobody to copy from
    assert collaboration(members, suspected={"x", "y", "w"}).reference() is None


def test_accused_in_reads_the_accused_of_a_signed_accusation_only():
    key = RSAPrivateKey()
    blob = make_accusation(key, "equivocation", "QmAccused", "prefix", 3, b"g" * 8, 0, [])
    assert accused_in(blob) == "QmAccused"
    assert accused_in(sign_statement(key, {"kind": "result", "accused": "QmAccused"})) == ""
    assert accused_in(b"not a statement") == ""
    assert accused_in(blob[:-3]) == ""
