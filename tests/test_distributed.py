"""mechir.distributed: single-process behaviour, and library calls under a 2-process gloo group
(spawned on the CPU) equal to the single-process results."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from mechir import distributed
from tests.distributed_helpers import (
    free_port,
    library_inputs,
    library_results,
    library_worker,
    torchrun_env,
)


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


# ---------------------------------------------------------------------- a world of one
def _outcome(fn) -> tuple:
    """``("ok", value)`` or ``("error", type name, message)`` of calling ``fn``."""
    try:
        return ("ok", fn())
    except Exception as err:  # the outcome is what is compared
        return ("error", type(err).__name__, str(err))


def world_of_one_behaviour() -> dict:
    """What the gathering functions do in a world of one: values, errors and whether the
    results are fresh copies (compared with and without a process group)."""
    x = torch.arange(6.0).reshape(3, 2).requires_grad_()
    ints = torch.arange(4).reshape(2, 2)
    out: dict = {
        "rank": distributed.rank(),
        "world": distributed.world_size(),
        "sharding": distributed.sharding(),
        "shard": distributed.shard(list(range(5))),
        "map_wrong_rows": _outcome(
            lambda: distributed.map_sharded(lambda xs: torch.zeros(len(xs) + 1), list(range(5)))
        ),
        "map": _outcome(
            lambda: distributed.map_sharded(lambda xs: torch.tensor(xs) * 2.0, list(range(5)))
        ),
        "map_empty": _outcome(lambda: distributed.map_sharded(lambda xs: torch.ones(1), [])),
        "gather_none": _outcome(lambda: distributed.gather_in_order(None, 3)),
        "gather_none_of_none": _outcome(lambda: distributed.gather_in_order(None, 0)),
        "gather_short": _outcome(lambda: distributed.gather_in_order(torch.zeros(2, 4), 5)),
        "gather_ints": _outcome(lambda: distributed.gather_in_order(ints, 2)),
        "all_gather_none": distributed.all_gather_tensors(None),
        "objects": distributed.all_gather_objects({"a": [1, 2]}),
        "unpicklable": _outcome(lambda: distributed.all_gather_objects(lambda: 0))[:2],
    }
    for name, fn in {
        "gather": lambda: distributed.gather_in_order(x, 3),
        "all_gather": lambda: distributed.all_gather_tensors(x)[0],
        "all_reduce": lambda: distributed.all_reduce_sum(x),
    }.items():
        y = fn()
        out[name] = (
            y.detach().clone(),
            y.requires_grad,
            y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr(),
        )
    obj = {"a": [1, 2]}
    out["objects_copied"] = distributed.all_gather_objects(obj)[0] is not obj
    return out


def world_of_one_worker(rank: int, port: int, out_dir: str) -> None:
    """A process group of one process (gloo): record :func:`world_of_one_behaviour`."""
    import os
    from pathlib import Path

    os.environ.update(torchrun_env(0, 1, port))
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    assert distributed.is_initialized()
    torch.save(world_of_one_behaviour(), Path(out_dir) / "group.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    else:
        assert a == b


def _no_group(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.is_initialized()


def test_a_world_of_one_without_a_group_checks_and_copies(monkeypatch):
    """Without a process group the gathering functions check rows per rank and picklability
    and return detached copies, as a group does (compared in the next test)."""
    _no_group(monkeypatch)
    alone = world_of_one_behaviour()
    assert alone["map_wrong_rows"] == (
        "error",
        "ValueError",
        "rank 0 returned 6 rows for its 5 items",
    )
    assert alone["gather_none"][2] == "rank 0 returned 0 rows for its 3 items"
    assert alone["gather_short"][2] == "rank 0 returned 2 rows for its 5 items"
    assert alone["unpicklable"][0] == "error" and alone["objects_copied"]
    for name in ("gather", "all_gather", "all_reduce"):
        value, requires_grad, shared = alone[name]
        assert torch.equal(value, torch.arange(6.0).reshape(3, 2))
        assert not requires_grad and not shared
    assert alone["gather_none_of_none"][1].shape == (0,)
    assert torch.equal(alone["map"][1], torch.arange(5.0) * 2)


@pytest.mark.slow
def test_a_world_of_one_is_the_same_with_and_without_a_group(tmp_path, monkeypatch):
    """Same values, checks and copies, whether a single process has a process group or not."""
    _no_group(monkeypatch)
    alone = world_of_one_behaviour()
    mp.spawn(world_of_one_worker, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    group = torch.load(tmp_path / "group.pt", weights_only=False)
    assert (group["world"], group["rank"]) == (1, 0)
    assert alone.keys() == group.keys()
    for key in alone:
        _assert_same(alone[key], group[key])


@pytest.mark.parametrize("missing", [("MASTER_ADDR", "MASTER_PORT"), ("MASTER_PORT",)])
def test_rank_and_world_size_without_master_addr_is_one_clear_line(monkeypatch, missing):
    env = torchrun_env(0, 1, 29500)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    for var in missing:
        monkeypatch.delenv(var)
    with pytest.raises(ValueError) as err:
        distributed.init_from_env("cpu")
    message = str(err.value)
    assert "\n" not in message and "torchrun" in message
    assert message.startswith(f"RANK and WORLD_SIZE are set but {' and '.join(missing)}")
    assert not distributed.is_initialized()
