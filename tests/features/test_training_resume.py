"""Resumable SAE training: a run interrupted mid-way and rerun resumes from its last checkpoint
and ends with the same SAE (weights, evaluation log) as an uninterrupted run of the same seed;
a checkpoint of another configuration is refused; the stream states restore exactly."""

from __future__ import annotations

import json

import pytest
import torch

from mechir.features.checkpoints import ResumableStream
from mechir.features.saes import training_config
from mechir.features.source import ActivationStream, RowStream
from mechir.features.training import train_sae
from mechir.store import ConfigMismatchError
from tests.features.conftest import PAIRS, SITE

D, BATCH, STEPS = 12, 16, 20


class Interrupted(Exception):
    pass


class Interrupting:
    """A stream that raises :class:`Interrupted` instead of its ``after``-th batch (a run
    killed mid-training); it forwards the inner stream's state."""

    def __init__(self, inner, after: int | None):
        self.inner, self.after, self.drawn = inner, after, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.after is not None and self.drawn >= self.after:
            raise Interrupted
        self.drawn += 1
        return next(self.inner)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


class Unsaveable:
    """A deterministic stream without a state (resumed by fast-forwarding)."""

    def __init__(self, inner, after: int | None):
        self.inner = Interrupting(inner, after)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.inner)


def rows_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(300, D, generator=g) * 2 + torch.randn(D, generator=g)


def run(tmp, wrap, *, after=None, architecture="topk", **kw):
    rows = rows_data()
    cfg = training_config(
        architecture,
        d_in=D,
        d_sae=32,
        site=SITE,
        k=3,
        normalize_activations="expected_average_only_in",
    )
    settings = (
        dict(
            steps=STEPS,
            batch_size=BATCH,
            lr=3e-3,
            eval_acts=rows[:64],
            eval_every=4,
            checkpoint_every=5,
            dead_feature_window=3,
            norm_batches=2,
            lr_decay_steps=6,
            init_b_dec="mean",
            log=tmp / "log.jsonl",
            progress=False,
        )
        | kw
    )
    stream = wrap(RowStream(rows, batch_size=BATCH, seed=1), after)
    return train_sae(cfg, stream, checkpoint=tmp / "ckpt", **settings)


def log_rows(tmp):
    return [json.loads(line) for line in (tmp / "log.jsonl").read_text().splitlines()]


def steps_checkpointed(tmp):
    return sorted(p.name for p in (tmp / "ckpt").iterdir() if p.name.startswith("step_"))


@pytest.mark.parametrize("wrap", [Interrupting, Unsaveable], ids=["state", "fast-forward"])
@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(
    tmp_path, wrap, architecture, monkeypatch
):
    from sae_lens.training.sae_trainer import SAETrainer

    whole = run(tmp_path / "whole", wrap, architecture=architecture)
    # norm estimate 2 batches + 13 steps, then killed: the last checkpoint is at step 10
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", wrap, after=2 + 13, architecture=architecture)
    assert steps_checkpointed(tmp_path / "cut") == ["step_000000010"]
    assert [r["step"] for r in log_rows(tmp_path / "cut")] == [4, 8, 12]
    resumed_stream_draws = []

    def counting(inner, after):
        s = wrap(inner, after)
        resumed_stream_draws.append(s)
        return s

    trained = []
    step = SAETrainer.step
    monkeypatch.setattr(SAETrainer, "step", lambda self, b: trained.append(1) or step(self, b))
    resumed = run(tmp_path / "cut", counting, architecture=architecture)
    # the resumed run trained only the 10 remaining steps (and redid no norm estimate)
    assert len(trained) == STEPS - 10
    drawn = resumed_stream_draws[0]
    drawn = drawn.inner if isinstance(drawn, Unsaveable) else drawn
    assert drawn.drawn == (STEPS - 10 if wrap is Interrupting else 2 + STEPS)
    assert steps_checkpointed(tmp_path / "cut") == [f"step_{STEPS:09d}"]
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    a, b = log_rows(tmp_path / "whole"), log_rows(tmp_path / "cut")
    assert [r["step"] for r in b] == [4, 8, 12, 16, 20]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), key


def test_a_finished_run_reruns_without_training(tmp_path):
    first = run(tmp_path, Interrupting)
    again = run(tmp_path, Interrupting, after=0)  # drawing any batch would raise
    for name, value in first.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=0)


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    with pytest.raises(Interrupted):
        run(tmp_path, Interrupting, after=2 + 7)
    with pytest.raises(ConfigMismatchError, match=r"another training configuration \(lr: "):
        run(tmp_path, Interrupting, lr=1e-3)


def test_row_stream_state_restores_the_same_batches():
    rows = rows_data()
    a = RowStream(rows, batch_size=7, seed=3)
    for _ in range(50):  # past an epoch boundary
        next(a)
    b = RowStream(rows, batch_size=7, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(60):
        torch.testing.assert_close(next(a), next(b), rtol=0, atol=0)
    with pytest.raises(ValueError, match="same training rows"):
        RowStream(rows[:10], batch_size=7).load_state_dict(a.state_dict())


def test_activation_stream_state_restores_the_same_batches(tiny):
    model, _, _ = tiny
    a = ActivationStream(model, PAIRS, SITE, batch_size=8, buffer_size=16, seed=0)
    assert isinstance(a, ResumableStream)
    for _ in range(5):
        next(a)
    b = ActivationStream(model, PAIRS, SITE, batch_size=8, buffer_size=16, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(6):
        torch.testing.assert_close(next(a), next(b), rtol=0, atol=0)


def test_a_checkpoint_being_written_elsewhere_is_refused(tmp_path):
    from mechir.features.checkpoints import locked
    from mechir.store import StoreLockedError

    with locked(tmp_path / "ckpt"):
        with pytest.raises(StoreLockedError, match="another process"):
            run(tmp_path, Interrupting)
    run(tmp_path, Interrupting, steps=2)  # free again once the holder is done
    assert steps_checkpointed(tmp_path) == ["step_000000002"]
