"""Nodes behind NAT, the parts without a network: relay caps, circuit addresses, and how routing,
placement, records and the swarm map treat relayed and unreachable nodes."""

import pytest

from swarm.cli.main import build_parser, main
from swarm.client.routing import min_latency_route, usable_servers
from swarm.dht.reachability import listening_ports
from swarm.dht.records import RELAYED_THROUGHPUT_FACTOR, RecordError, check_message
from swarm.dht.relay import circuit_maddr_bytes, relay_peer_id
from swarm.dht.relay_limits import RelayLimits
from swarm.dht.swarm_map import reach_of
from swarm.node.placement import block_throughputs
from swarm.proto import swarm_pb2

RELAY = "/ip4/10.231.0.2/tcp/31337/p2p/QmZR198sywooAg8GTyYa8eRa8dUe7gbzrkXrBSAqzmVHX2"


def info(peer, throughput=10.0, **reach):
    return swarm_pb2.ServerInfo(
        peer_id=peer,
        model="m",
        state=swarm_pb2.ServerInfo.ONLINE,
        start_block=0,
        end_block=2,
        throughput=throughput,
        block_hashes=["0" * 64] * 2,
        **reach,
    )


def test_relay_caps_become_p2pd_flags_and_bad_caps_are_refused():
    flags = RelayLimits(max_circuits=4, time_limit=90).daemon_flags()
    assert flags["relayService"] == 1 and flags["relayMaxCircuits"] == 4 and flags["relayTimeLimit"] == "90s"
    with pytest.raises(ValueError, match="max_circuits"):
        RelayLimits(max_circuits=0).daemon_flags()
    with pytest.raises(ValueError, match="time_limit"):
        RelayLimits(time_limit=0).daemon_flags()


def test_cli_relay_flags_are_checked(capsys):
    assert main(["dht", "--relay-max-reservations", "0"]) == 2
    assert "max_reservations must be positive" in capsys.readouterr().err
    args = build_parser().parse_args(["node", "--model", "x", "--blocks", "0:1"])
    assert args.use_relay and not args.relay_service  # nodes use relays, and relay for nobody, by default
    assert build_parser().parse_args(["dht"]).relay_service


def test_circuit_addresses_are_written_with_the_relay_multihash():
    relay = relay_peer_id(RELAY)
    encoded = circuit_maddr_bytes(f"{RELAY}/p2p-circuit")
    assert relay.to_bytes() in encoded and encoded.endswith(b"\xa2\x02")  # /p2p-circuit's code, 0x0122
    with pytest.raises(ValueError, match="not a circuit address"):
        circuit_maddr_bytes(RELAY)
    with pytest.raises(ValueError, match="must end with /p2p/"):
        relay_peer_id("/ip4/10.0.0.1/tcp/1")


def test_only_tcp_ports_outside_circuits_are_dialed_back():
    maddrs = [
        f"{RELAY}/p2p-circuit",
        "/ip4/10.0.0.2/tcp/4000/p2p/x",
        "/ip4/10.0.0.2/udp/5/quic",
        "/ip4/1/tcp/4000",
    ]
    assert listening_ports(maddrs) == [4000]


def test_unreachable_nodes_are_never_used_and_relayed_ones_lose_ties():
    direct, relayed, unreachable = (
        info("direct"),
        info("relayed", using_relay=True),
        info("nat", 100, unreachable=True),
    )
    servers = {s.peer_id: s for s in (direct, relayed, unreachable)}
    usable = usable_servers(servers, None)
    assert [s.peer_id for s in usable] == ["direct", "relayed"]
    assert [s.peer_id for s in min_latency_route(usable, 0, 2, {"direct": 0.05, "relayed": 0.05})] == [
        "direct"
    ]
    # a relayed node with enough more throughput still wins
    fast = info("relayed", 100 / RELAYED_THROUGHPUT_FACTOR, using_relay=True)
    assert [
        s.peer_id for s in min_latency_route([direct, fast], 0, 2, {"direct": 0.05, "relayed": 0.05})
    ] == ["relayed"]


def test_placement_counts_relayed_nodes_less_and_unreachable_ones_as_nothing():
    totals = block_throughputs([info("relayed", using_relay=True), info("nat", 50, unreachable=True)], 2)
    assert totals == pytest.approx([10 * RELAYED_THROUGHPUT_FACTOR + 1e-9] * 2)


def test_records_bound_relay_addresses_and_the_map_names_reach():
    check_message(info("relayed", using_relay=True, relay_maddrs=[f"{RELAY}/p2p-circuit"]))
    with pytest.raises(RecordError, match="relay_maddrs"):
        check_message(info("relayed", using_relay=True, relay_maddrs=[RELAY]))
    with pytest.raises(RecordError, match="relay_maddrs"):
        check_message(info("relayed", using_relay=True, relay_maddrs=[f"{RELAY}/p2p-circuit"] * 5))
    assert [
        reach_of(info("a")),
        reach_of(info("b", using_relay=True)),
        reach_of(info("c", unreachable=True)),
    ] == [
        "direct",
        "relayed",
        "unreachable",
    ]
