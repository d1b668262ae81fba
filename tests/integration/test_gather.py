"""`Client.gather`: many results through WAIT_MANY requests, in the order
asked, with failures, timeouts, unknown ids and replies past the size budget."""

from __future__ import annotations

import uuid

import pytest
from helpers.cluster import Cluster

from sdk import InvalidRequest, ResultTimeout, TaskFailed, TaskNotFound, protocol
from sdk import client as client_module


@pytest.mark.timeout(60)
def test_gather_returns_every_value_in_the_order_asked(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("w1", capacity=4)
    client = cluster.client()
    handles = client.submit_many([("echo", n) for n in range(40)])

    # Ids may repeat and mix handles with plain ids
    asked = [*handles, handles[3].id, handles[0]]
    values = client.gather(asked, timeout=30)

    assert values == [*range(40), 3, 0]


@pytest.mark.timeout(60)
def test_gather_spans_several_requests(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.start_broker()
    cluster.start_worker("w1", capacity=4)
    client = cluster.client()
    monkeypatch.setattr(client_module, "GATHER_CHUNK", 7)
    handles = client.submit_many([("echo", n) for n in range(30)])

    assert client.gather(handles, timeout=30) == list(range(30))


@pytest.mark.timeout(60)
def test_gather_raises_the_first_failure_or_returns_it(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("w1", capacity=4)
    client = cluster.client()
    handles = client.submit_many(
        [("echo", 1), ("fail", "first"), ("echo", 3), ("fail", "second")]
    )

    with pytest.raises(TaskFailed) as info:
        client.gather(handles, timeout=30)
    assert (info.value.task_id, "first" in str(info.value)) == (handles[1].id, True)

    values = client.gather(handles, timeout=30, return_exceptions=True)
    assert [v if not isinstance(v, TaskFailed) else v.task_id for v in values] == [
        1,
        handles[1].id,
        3,
        handles[3].id,
    ]


@pytest.mark.timeout(60)
def test_gather_times_out_naming_what_is_still_open(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("w1", capacity=2)
    client = cluster.client()
    quick = client.submit("echo", "done")
    slow = client.submit("sleep", 30)

    with pytest.raises(ResultTimeout) as info:
        client.gather([quick, slow], timeout=0.5)

    assert slow.id in str(info.value) and "1 task(s)" in str(info.value)
    client.cancel(slow.id)


@pytest.mark.timeout(60)
def test_gather_of_an_unknown_id_is_task_not_found(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_worker("w1")
    client = cluster.client()
    known = client.submit("echo", 1)
    never = uuid.uuid4().hex

    with pytest.raises(TaskNotFound, match=never):
        client.gather([known, never], timeout=10)
    values = client.gather([never, known], timeout=10, return_exceptions=True)
    assert (type(values[0]), values[1]) == (TaskNotFound, 1)
    with pytest.raises(InvalidRequest, match="list of task ids"):
        client.gather(known.id)


@pytest.mark.timeout(60)
def test_results_past_the_reply_budget_are_fetched_one_by_one(
    cluster: Cluster,
) -> None:
    # Given a broker whose replies hold 100 kB of results, and three of 60 kB
    limit = {"HAKOBU_MAX_PAYLOAD_BYTES": "100000"}
    cluster.start_broker(env=limit)
    cluster.start_worker("w1", 3, (), env=limit)
    client = cluster.client()
    handles = client.submit_many([("probe_big_result", 60_000)] * 3)

    # When they are gathered
    values = client.gather(handles, timeout=30)

    # Then every value arrives whole
    assert [len(v) for v in values] == [60_000] * 3


@pytest.mark.timeout(30)
def test_wait_many_refuses_more_ids_than_allowed(cluster: Cluster) -> None:
    cluster.start_broker()
    client = cluster.client()
    too_many = [uuid.uuid4().hex for _ in range(1001)]

    with pytest.raises(InvalidRequest, match="1 to 1000 ids"):
        client._call(lambda rid: protocol.WaitMany(rid, too_many, 0.0))
