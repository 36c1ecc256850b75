"""The running-batch context (mechir/running.py): correct across threads, asyncio tasks, nested
models, out-of-order exits and backward hooks; hooks scoped to the context that added them.

Regression tests of the reproductions r1_threads.py, r2_threads_modern.py, r2b.py and r3_stack.py
(../shared/repros)."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest
import torch

from mechir import load_cross_encoder
from mechir.hooks import direction_ablation_hooks, head_knockout_hooks, neuron_ablation_hooks
from mechir.running import per_forward, refuse_active_hooks, running_batch
from tests.families.builders import save_tiny_family
from tests.helpers import tiny_cross_encoder

WORDS = "the cat dog fish runs sleeps blue small big house red car road water tree bird".split()


@pytest.fixture
def one_thread():
    """Bitwise-reproducible scores: one intra-op thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_batch(model, rng: random.Random, rows: int = 3, width: int = 24):
    """``rows`` random pairs of exactly ``width`` tokens (same shape, other parts): one row's
    document is long enough to be truncated to ``width``."""
    queries = [" ".join(rng.choices(WORDS, k=rng.randint(1, 5))) for _ in range(rows)]
    docs = [" ".join(rng.choices(WORDS, k=rng.randint(2, 14))) for _ in range(rows)]
    docs[rng.randrange(rows)] = " ".join(rng.choices(WORDS, k=2 * width))
    batch = model.encode(queries, docs, max_length=width)
    assert batch.input_ids.shape == (rows, width)
    return batch


def test_eight_threads_score_exactly_with_their_own_hooks(tmp_path: Path, one_thread):
    model, _, _ = tiny_cross_encoder(tmp_path)
    hook_sets = [
        [],
        direction_ablation_hooks(model, attending="query", attended="document"),
        direction_ablation_hooks(model, attending="document", attended="query", mode="renormalize"),
        head_knockout_hooks(model, ["0/1", "1/2"], parts="document"),
        neuron_ablation_hooks(model, {0: range(0, 64, 3)}, parts="query"),
    ]
    rng = random.Random(0)
    jobs = []  # (thread, batch, hooks index)
    for thread in range(8):
        for _ in range(50):
            jobs.append((thread, random_batch(model, rng), rng.randrange(len(hook_sets))))
    expected = [model.score(b, hooks=hook_sets[h]) for _, b, h in jobs]
    got: dict[int, torch.Tensor] = {}
    errors: list[str] = []
    start = threading.Barrier(8)

    def work(thread: int) -> None:
        try:
            start.wait(timeout=30)
            for i, (t, batch, h) in enumerate(jobs):
                if t == thread:
                    got[i] = model.score(batch, hooks=hook_sets[h])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(got) == len(jobs)
    for i, scores in got.items():
        torch.testing.assert_close(scores, expected[i], atol=0, rtol=0)
    assert model._running == () and not any(p.fwd_hooks for p in model.hook_dict.values())


def test_threads_interleaved_inside_a_forward_read_their_own_batch(tmp_path: Path):
    """r1_threads.py: both threads stop inside the same hook at once (a barrier), each reads the
    batch of its own forward pass; the other thread's hook is not run."""
    model, _, _ = tiny_cross_encoder(tmp_path)
    short = model.encode(["cat"], ["the cat runs"])
    long = model.encode(["how big is the blue fish"], ["a small fish is blue and the dog sleeps"])
    barrier = threading.Barrier(2)
    seen: dict[str, list[tuple[int, int]]] = {}

    def probe(resid, hook):
        name = threading.current_thread().name
        seen.setdefault(name, []).append((resid.shape[1], running_batch(hook).input_ids.shape[1]))
        barrier.wait(timeout=10)

    def work(batch):
        with torch.no_grad():
            model.run_with_hooks(batch, fwd_hooks=[("blocks.0.hook_resid_pre", probe)])

    threads = [
        threading.Thread(target=work, args=(b,), name=n) for n, b in (("a", short), ("b", long))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    width_a, width_b = short.input_ids.shape[1], long.input_ids.shape[1]
    assert seen == {"a": [(width_a, width_a)], "b": [(width_b, width_b)]}


def test_modernbert_mean_pooling_in_two_threads(tmp_path: Path, one_thread):
    """r2_threads_modern.py / r2b.py: mean pooling reads the attention mask of its own thread's
    batch even when both threads are inside the pooler at once (same-shape batches)."""
    model = load_cross_encoder(save_tiny_family("modernbert", tmp_path), device="cpu")
    model.pooler.pooling = "mean"
    b1 = model.encode(
        ["cat", "how big is the blue fish"], ["the cat runs", "a small fish is blue and dog"]
    )
    b2 = model.encode(
        ["how big is the blue fish", "cat"], ["a small fish is blue and dog", "the cat runs"]
    )
    assert b1.input_ids.shape == b2.input_ids.shape
    ref1, ref2 = model.score(b1), model.score(b2)
    forward = model.pooler.forward
    barrier = threading.Barrier(2)

    def slow_pooler(*args, **kwargs):
        barrier.wait(timeout=10)
        return forward(*args, **kwargs)

    model.pooler.forward = slow_pooler
    out: dict[str, torch.Tensor] = {}
    threads = [
        threading.Thread(target=lambda n=n, b=b: out.__setitem__(n, model.score(b)))
        for n, b in (("b1", b1), ("b2", b2))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(out["b1"], ref1, atol=0, rtol=0)
    torch.testing.assert_close(out["b2"], ref2, atol=0, rtol=0)


def test_out_of_order_exits_and_exceptions(tmp_path: Path):
    """r3_stack.py 1, 2 and 4."""
    model, _, _ = tiny_cross_encoder(tmp_path)
    b1 = model.encode(["cat"], ["the cat runs"])
    b2 = model.encode(["how big is the blue fish"], ["a small fish is blue"])
    with pytest.raises(KeyError):
        with model.running_on(b1):
            raise KeyError("boom")
    assert model._running == ()

    def bad(x, hook):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        model.run_with_hooks(b1, fwd_hooks=[("blocks.0.hook_resid_pre", bad)])
    assert model._running == ()
    assert not any(p.fwd_hooks or p.bwd_hooks for p in model.hook_dict.values())

    c1, c2 = model.running_on(b1), model.running_on(b2)
    c1.__enter__()
    c2.__enter__()
    c1.__exit__(None, None, None)  # the outer context leaves first
    assert torch.equal(model.running_batch.input_ids, b2.input_ids)
    c2.__exit__(None, None, None)
    assert model._running == ()
    with pytest.raises(RuntimeError, match="no forward pass is running"):
        _ = model.running_batch


def test_nested_forward_of_the_same_and_of_another_model(tmp_path: Path):
    """r3_stack.py 3: a forward pass started inside a hook reads its own batch, and the outer
    hook reads the outer batch afterwards; likewise for a second model."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    model, _, _ = tiny_cross_encoder(tmp_path / "a")
    other, _, _ = tiny_cross_encoder(tmp_path / "b", seed=1)
    b1 = model.encode(["cat"], ["the cat runs"])
    b2 = model.encode(["how big is the blue fish"], ["a small fish is blue"])
    seen: list[tuple[str, int]] = []
    nested: list[bool] = []

    def inner(x, hook):
        seen.append(("other", running_batch(hook).input_ids.shape[1]))

    def outer(x, hook):
        if not nested:
            nested.append(True)  # the nested forward of the same model runs this hook too
            with torch.no_grad():
                model(b2)  # same model, another batch
                other.run_with_hooks(b2, fwd_hooks=[("blocks.0.hook_resid_pre", inner)])
        seen.append(("model", running_batch(hook).input_ids.shape[1]))

    with torch.no_grad():
        model.run_with_hooks(b1, fwd_hooks=[("blocks.1.hook_resid_pre", outer)])
    w1, w2 = b1.input_ids.shape[1], b2.input_ids.shape[1]
    assert seen == [("model", w2), ("other", w2), ("model", w1)]


def test_backward_hooks_read_the_batch_of_their_forward_pass(tmp_path: Path):
    """r3_stack.py 5, also when the backward pass runs on another thread."""
    model, _, _ = tiny_cross_encoder(tmp_path)
    batch = model.encode(["cat", "red car"], ["the cat runs", "a red car on the road"])
    seen: list[torch.Size] = []

    def bwd(grad, hook):
        seen.append(running_batch(hook).input_ids.shape)

    with model.hooks(bwd_hooks=[("blocks.0.hook_resid_pre", bwd)]):
        score = model(batch)
    thread = threading.Thread(target=lambda: score.sum().backward())
    thread.start()
    thread.join()
    assert seen == [batch.input_ids.shape]


def test_backward_hook_gradient_equals_the_cached_one_and_can_replace_it(tmp_path: Path):
    """A backward hook receives d score / d activation, and what it returns replaces it."""
    model, _, _ = tiny_cross_encoder(tmp_path)
    batch = model.encode(["cat"], ["the cat runs in the house"])
    name = "blocks.1.hook_resid_pre"
    resid = {}
    cache_hook = lambda act, hook: resid.__setitem__("x", act)  # noqa: E731
    with model.hooks(fwd_hooks=[(name, cache_hook)]):
        score = model(batch)
    (expected,) = torch.autograd.grad(score.sum(), resid["x"])
    got = []
    with model.hooks(bwd_hooks=[(name, lambda g, hook: got.append(g.clone()))]):
        model(batch).sum().backward()
    torch.testing.assert_close(got[0], expected, atol=1e-6, rtol=0)
    model.zero_grad(set_to_none=True)
    # a later forward hook replaces the activation: the gradient is the replacement's
    seen = []
    doubled = lambda act, hook: act * 2  # noqa: E731
    with model.hooks(
        fwd_hooks=[(name, doubled)], bwd_hooks=[(name, lambda g, hook: seen.append(g))]
    ):
        model(batch).sum().backward()
    assert len(seen) == 1
    model.zero_grad(set_to_none=True)
    # zeroing the gradient at the hook stops it flowing into the embeddings
    with model.hooks(bwd_hooks=[(name, lambda g, hook: torch.zeros_like(g))]):
        model(batch).sum().backward()
    assert model.embed.embed.W_E.grad.abs().max() == 0
    model.zero_grad(set_to_none=True)


def test_asyncio_tasks_each_see_their_own_batch(tmp_path: Path):
    model, _, _ = tiny_cross_encoder(tmp_path)
    batches = [model.encode(["cat"] * (i + 1), ["the cat runs"] * (i + 1)) for i in range(4)]

    async def task(batch):
        with model.running_on(batch):
            await asyncio.sleep(0)  # let the other tasks enter their contexts
            return len(model.running_batch)

    async def main():
        return await asyncio.gather(*(task(b) for b in batches))

    assert asyncio.run(main()) == [1, 2, 3, 4]


def test_hooks_of_one_thread_do_not_fire_in_another(tmp_path: Path):
    """Hooks added by ``with model.hooks(...)`` fire only for that thread's forward passes; on
    exit, exactly its own hooks are removed."""
    model, _, _ = tiny_cross_encoder(tmp_path)
    batch = model.encode(["cat"], ["the cat runs"])
    inside, leave = threading.Event(), threading.Event()
    fired: list[str] = []

    def mark(act, hook):
        fired.append(threading.current_thread().name)

    def holder():
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", mark)]):
            inside.set()
            leave.wait(timeout=10)
            model(batch)

    thread = threading.Thread(target=holder, name="holder")
    thread.start()
    inside.wait(timeout=10)
    with torch.no_grad():
        model(batch)  # this thread: the holder's hook must not fire
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", mark)]):
            model(batch)
    leave.set()
    thread.join()
    assert sorted(fired) == ["MainThread", "holder"]
    assert not any(p.fwd_hooks for p in model.hook_dict.values())


def test_per_forward_values_belong_to_their_forward_pass(tmp_path: Path):
    """A value computed once per forward pass is never handed to another forward pass running
    at the same time (it lives in the running frame, not in the factory)."""
    model, _, _ = tiny_cross_encoder(tmp_path)
    widths = per_forward(lambda batch: batch.input_ids.shape[1])
    barrier = threading.Barrier(2)
    seen: dict[str, list[int]] = {}

    def hook(act, hook):
        first = widths(hook)
        barrier.wait(timeout=10)  # the other thread computes its own value meanwhile
        seen.setdefault(threading.current_thread().name, []).append((first, widths(hook)))

    def work(batch):
        with torch.no_grad():
            model.run_with_hooks(batch, fwd_hooks=[("blocks.0.hook_resid_pre", hook)])

    short = model.encode(["cat"], ["the cat runs"])
    long = model.encode(["how big is the blue fish"], ["a small fish is blue and the dog sleeps"])
    threads = [
        threading.Thread(target=work, args=(b,), name=n) for n, b in (("a", short), ("b", long))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wa, wb = short.input_ids.shape[1], long.input_ids.shape[1]
    assert seen == {"a": [(wa, wa)], "b": [(wb, wb)]}


def test_refuse_active_hooks_counts_this_contexts_hooks_only(tmp_path: Path):
    """``refuse_active_hooks`` refuses in one line while hooks of this thread's ``with
    model.hooks(...)`` block or unscoped hooks are active, and not for another thread's block
    or after the block exits."""
    model, _, _ = tiny_cross_encoder(tmp_path)
    refuse_active_hooks(model, "an engine")  # no hooks: nothing to refuse
    knockout = head_knockout_hooks(model, layers=[0, 1], heads=[0])
    with model.hooks(fwd_hooks=knockout):
        assert model.active_hooks() == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
        with pytest.raises(ValueError) as info:
            refuse_active_hooks(model, "an engine")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("an engine runs its own forward pass")
    assert "2 hooks are active (blocks.0.attn.hook_z, blocks.1.attn.hook_z)" in message
    assert "call it outside the `with model.hooks(...)` block" in message
    refuse_active_hooks(model, "an engine")  # the block exited
    inside, leave = threading.Event(), threading.Event()

    def holder():
        with model.hooks(fwd_hooks=knockout):
            inside.set()
            leave.wait(timeout=10)

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(timeout=10)
    try:
        assert model.active_hooks() == []  # another thread's block does not fire here
        refuse_active_hooks(model, "an engine")
    finally:
        leave.set()
        thread.join()
    with model.hooks(fwd_hooks=knockout[:1], reset_hooks_end=False):
        pass  # unscoped: fires everywhere until reset_hooks()
    try:
        with pytest.raises(ValueError, match=r"1 hook is active \(blocks\.0\.attn\.hook_z\)"):
            refuse_active_hooks(model, "an engine")
    finally:
        model.reset_hooks()
    refuse_active_hooks(model, "an engine")
