"""`serve --workers ray` over several Ray nodes on one machine (ray.cluster_utils.Cluster): a node that goes
away mid-job loses nothing. Its own module: a process joins one Ray cluster at a time."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from sdstudio.server.app import create_app
from sdstudio.server.cluster.options import ClusterOptions
from sdstudio.testing.live import wait_for_job
from tests.test_ray import PROMPT, actors_ready, demo_settings, wait_running

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs (the server's process) and two worker nodes of one CPU each."""
    made = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [made.add_node(num_cpus=1) for _ in range(2)]
    made.wait_for_nodes()
    ray.init(address=made.address, log_to_driver=False)
    yield made, nodes
    ray.shutdown()
    made.shutdown()


def test_a_node_removed_mid_job_loses_nothing(cluster, tmp_path):
    made, nodes = cluster
    with TestClient(create_app(demo_settings(tmp_path), tmp_path / "data", cluster=ClusterOptions())) as client:
        slots = actors_ready(client)
        assert len(slots) == 2  # one engine worker per node with CPUs
        ids = [client.post("/api/v1/jobs", json={"request": {"prompt": PROMPT, "steps": 30, "seed": s}}).json()["id"]
               for s in (1, 2, 3)]
        wait_running(client, ids[0], step=2)
        handle = client.app.state.sdstudio.worker._running(ids[0])[0]
        node_id = ray.get(handle.node_id.remote())
        made.remove_node(next(n for n in nodes if n.node_id == node_id))
        jobs = [wait_for_job(client, i, timeout=300) for i in ids]
        assert [j["status"] for j in jobs] == ["done"] * 3, jobs
        assert client.app.state.sdstudio.store.get(ids[0]).attempts == 2
        assert all(len(j["result"]["images"]) == 1 for j in jobs)
