"""mechir.distributed: single-process behaviour, and library calls under a 2-process gloo group
(spawned on the CPU) equal to the single-process results."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from mechir import distributed
from tests.distributed_helpers import free_port, library_inputs, library_results, library_worker


def test_single_process_is_a_world_of_one(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_main() and not distributed.sharding() and not distributed.launched()
    assert distributed.init_from_env() is None
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    assert not distributed.is_initialized()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(distributed.gather_in_order(x, 3), x)
    assert torch.equal(distributed.all_reduce_sum(x), x)
    assert distributed.all_gather_objects("a") == ["a"]
    assert distributed.prefix() == ""


def test_shard_indices_partition_in_strides():
    shards = [distributed.shard_indices(10, rank_=r, world=3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert distributed.shard_indices(1, rank_=1, world=2) == []
    with pytest.raises(ValueError, match="rank 2 out of range for a world of 2"):
        distributed.shard_indices(4, rank_=2, world=2)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Results of :func:`library_results` on each rank of a 2-process gloo group."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(library_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    torch.set_num_threads(1)
    return library_results(*library_inputs(tmp_path_factory.mktemp("one")))


def test_group_primitives(two_ranks):
    for r, res in enumerate(two_ranks):
        assert res["rank"] == r and res["device"] == "cpu"
        assert res["objects"] == [{"rank": 0}, {"rank": 1}]
        torch.testing.assert_close(res["uneven"], torch.arange(5.0)[:, None] * 10)
        torch.testing.assert_close(res["one"], torch.ones(1, 2))


def test_sharded_scores_and_rerank_equal_one_process(two_ranks, one_process):
    # equal up to float32 round-off: a rank's sub-batches pad to other lengths than one process's,
    # so the attention matmuls accumulate over other key counts (differences ~1e-6 on scores ~1)
    for res in two_ranks:
        torch.testing.assert_close(res["scores"], one_process["scores"], rtol=0, atol=1e-5)
        assert res["run"].keys() == one_process["run"].keys()
        for qid, docs in one_process["run"].items():
            assert list(res["run"][qid]) == list(docs)
            for did, s in docs.items():
                assert abs(res["run"][qid][did] - s) <= 1e-5


def test_sharded_nig_means_equal_one_process(two_ranks, one_process):
    ref = one_process["nig"]
    assert ref["keys"] == ["b", "a", "c"]  # insertion order of a single process
    for res in two_ranks:
        nig = res["nig"]
        assert nig["keys"] == ref["keys"]
        assert nig["counts"] == ref["counts"] and nig["layers"] == ref["layers"]
        assert nig["completeness_count"] == ref["completeness_count"] == 11
        for k in ref["keys"]:
            torch.testing.assert_close(nig["means"][k], ref["means"][k], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(nig["std"][k], ref["std"][k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(nig["completeness"], ref["completeness"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["heads_by_position", "resid_by_part"])
def test_sharded_patch_sweep_equals_one_process(two_ranks, one_process, name):
    ref = one_process[name]
    for res in two_ranks:
        got = res[name]
        assert got["coords"] == ref["coords"] and got["pair_ids"] == ref["pair_ids"]
        assert torch.equal(got["patched"].isnan(), ref["patched"].isnan())
        torch.testing.assert_close(
            got["patched"], ref["patched"], equal_nan=True, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(got["clean"], ref["clean"], atol=1e-6, rtol=0)
        torch.testing.assert_close(got["corrupted"], ref["corrupted"], atol=1e-6, rtol=0)
