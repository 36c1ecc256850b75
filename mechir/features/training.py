"""Training SAEs through SAELens's ``SAETrainer``, with mechir's own evaluation, and
transcoders with a minimal loop of mechir's own.

**SAEs** (:func:`train_sae`). SAELens's ``SAETrainer`` does the optimisation (its Adam, LR and
coefficient schedules, dead-latent bookkeeping, auxiliary losses, activation-norm scaling and
its folding, the final metadata); mechir drives it through the trainer's public per-step seams
(``maybe_reset_sparsity``, ``step``), the way SAELens's own ``MultiSAETrainer`` does, because
``SAETrainer.fit`` evaluates and logs only to wandb. Every ``eval_every`` steps mechir evaluates
the SAE on held-out activations and writes one JSON line (step, samples, MSE, FVU, L0, dead and
dense latents, learning rate) to ``log``; a tqdm bar shows progress. With a ``checkpoint``
directory the run is resumable (:mod:`mechir.features.checkpoints`: SAELens's own checkpoint of
the SAE and trainer state, plus the stream's position and the evaluation rows). It trains on one
intra-op thread by default: a step is a few ``[batch, d] x [d, d_sae]`` matmuls and a top-k, and
on a shared CPU a second thread's synchronisation cost more than it gained (5x slower per step
measured, ``benchmarks/bench_features.py``). Pitfalls of SAELens 6.54
handled here: every batch has exactly ``batch_size`` rows (:class:`ActivationStream`); ``lr_end``
is set (``None`` fails); ``dead_feature_window`` (in steps, default 1000) and the number of
batches of the norm estimate (default 1000) are sized to the run. The result is saved with
``save_inference_model`` (SAELens's format: BatchTopK as JumpReLU) and loaded back with SAELens,
so what is returned is exactly what a later ``load_sae`` gives.

**Transcoders** (:func:`train_transcoder`): SAELens loads transcoders (``Transcoder``: ReLU
encoder from one site, decoder to another) but its trainer only reconstructs its own input. A
transcoder is trained here by a minimal loop of mechir's own (Adam on ``||y - y_hat||^2 +
lambda * sum_i f_i ||W_dec,i||``, the standard SAE's L1 objective with an output target), kept
apart rather than registered as a SAELens training class because SAELens's training step and
data provider carry one tensor (the input) per row and a registered class would have to smuggle
the target through it. It is saved in SAELens's ``transcoder`` format and loaded by SAELens.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxtyping import Float

from mechir.features.saes import load_sae, require_sae_lens
from mechir.lazy import lazy_import

torch = lazy_import("torch")

#: A latent is *dense* when it fires on more than this fraction of the evaluation rows.
DENSE_FRACTION = 0.1


def reconstruction_metrics(
    x: Float[torch.Tensor, "n d"],
    x_hat: Float[torch.Tensor, "n d"],
    features: Float[torch.Tensor, "n d_sae"],
) -> dict[str, float]:
    """``mse`` (per row, summed over ``d``), ``fvu = sum ||x - x_hat||^2 / sum ||x - mean||^2``,
    ``l0`` (mean active latents per row), ``dead`` (latents never active on these rows),
    ``dense`` (latents active on more than :data:`DENSE_FRACTION` of them)."""
    x, x_hat = x.double(), x_hat.double()
    err = (x - x_hat).pow(2).sum(-1)
    var = (x - x.mean(0)).pow(2).sum(-1)
    active = features != 0
    freq = active.double().mean(0)
    return {
        "mse": err.mean().item(),
        "fvu": (err.sum() / var.sum().clamp_min(1e-30)).item(),
        "l0": active.sum(-1).double().mean().item(),
        "dead": int((freq == 0).sum()),
        "dense": int((freq > DENSE_FRACTION).sum()),
    }


@torch.no_grad()
def evaluate_sae(
    sae: Any, acts: Float[torch.Tensor, "n d"], *, chunk: int = 4096
) -> dict[str, float]:
    """:func:`reconstruction_metrics` of ``sae`` (inference or training form, eval mode) on raw
    activations ``acts``."""
    was_training = sae.training
    sae.eval()
    xs, hats, feats = [], [], []
    for start in range(0, len(acts), chunk):
        x = acts[start : start + chunk].to(sae.device, sae.dtype)
        f = sae.encode(x)
        if f.is_sparse:
            f = f.to_dense()
        xs.append(x.float().cpu())
        hats.append(sae.decode(f).float().cpu())
        feats.append(f.float().cpu())
    if was_training:
        sae.train()
    return reconstruction_metrics(torch.cat(xs), torch.cat(hats), torch.cat(feats))


def inference_view(trainer: Any) -> Any:
    """The SAE as it would be saved now (scaler folded, SAELens's inference form, e.g.
    BatchTopK as JumpReLU), for evaluation mid-training; the training SAE is left alone."""
    import copy

    view = copy.deepcopy(trainer.sae)
    factor = trainer.activation_scaler.scaling_factor
    if factor is not None:
        view.fold_activation_norm_scaling_factor(factor)
    return save_and_reload(view, None)


def train_sae(
    config: Any,
    stream: Iterator[Float[torch.Tensor, "batch d"]],
    *,
    steps: int,
    batch_size: int,
    lr: float = 3e-4,
    eval_acts: Float[torch.Tensor, "n d"] | None = None,
    eval_every: int = 100,
    log: str | Path | None = None,
    output: str | Path | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    norm_batches: int | None = None,
    dead_feature_window: int | None = None,
    lr_warm_up_steps: int = 0,
    lr_decay_steps: int = 0,
    init_b_dec: str = "zeros",
    threads: int | None = 1,
    seed: int = 0,
    progress: bool = True,
) -> Any:
    """Train an SAE of SAELens ``config`` (:func:`mechir.features.saes.training_config`) on
    ``stream`` (``[batch_size, d_in]`` batches, e.g. :class:`ActivationStream`) for ``steps``
    steps through SAELens's ``SAETrainer``, evaluating on ``eval_acts`` every ``eval_every``
    steps (JSON lines written to ``log``, rewritten from the start of the run; the SAE is
    evaluated in the form it is saved in). Saved to ``output`` in SAELens's format (its
    inference form); returns the SAE loaded back by SAELens.

    With ``checkpoint`` (a directory), the run is resumable: every ``checkpoint_every`` steps
    (default ``eval_every``) the SAE, the trainer's state, the stream's position and the
    evaluation rows are saved there (:mod:`mechir.features.checkpoints`), and a rerun with the
    same arguments resumes from the last checkpoint, giving the same SAE as an uninterrupted
    run; a checkpoint of another configuration is refused in one line.

    Args:
        norm_batches: batches of the activation-norm estimate when
            ``config.normalize_activations == "expected_average_only_in"`` (default
            ``min(1000, max(1, steps // 10))``; SAELens's 1000 would eat a small run).
        dead_feature_window: steps without firing before a latent counts as dead (and feeds
            TopK's auxiliary loss; default ``min(1000, max(1, steps // 4))``).
        lr_decay_steps: the last steps over which the learning rate decays linearly to 0
            (SAELens's decay; 0: constant).
        init_b_dec: ``"zeros"`` (SAELens's initialisation) or ``"mean"``: the decoder bias
            starts at the mean of the norm-estimate batches (scaled as the SAE sees them), so
            no latent is spent on the mean activation.
        threads: torch intra-op threads while training (restored afterwards; None leaves
            them). One by default: a step is a few small matmuls, for which a second thread on
            a busy machine costs more in synchronisation than it gains (measured 5x slower
            with 2 threads on the shared 2-core machine, ``benchmarks/bench_features.py``).
    """
    require_sae_lens()
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer
    from tqdm.auto import tqdm

    from mechir.features import checkpoints

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if init_b_dec not in ("zeros", "mean"):
        raise ValueError(f"init_b_dec must be 'zeros' or 'mean', got {init_b_dec!r}")
    torch.manual_seed(seed)
    sae = TrainingSAE.from_dict(config.to_dict())
    window = dead_feature_window or min(1000, max(1, steps // 4))
    n_norm = norm_batches or min(1000, max(1, steps // 10))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr / 10 if lr_decay_steps else lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=lr_warm_up_steps,
        lr_decay_steps=lr_decay_steps,
        device=str(sae.device),
        dead_feature_window=window,
        feature_sampling_window=max(window, 1),
        n_batches_for_norm_estimate=n_norm,
        logger=LoggingConfig(log_to_wandb=False),
    )
    counted = _Counted(_exact_batches(stream, batch_size, config.d_in))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=counted)
    run_config = {
        "sae": json.loads(json.dumps(config.to_dict(), default=str)),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "eval_every": eval_every,
        "eval_rows": None if eval_acts is None else list(eval_acts.shape),
        "eval_sum": None if eval_acts is None else float(eval_acts.double().sum()),
        "norm_batches": n_norm,
        "dead_feature_window": window,
        "lr_warm_up_steps": lr_warm_up_steps,
        "lr_decay_steps": lr_decay_steps,
        "init_b_dec": init_b_dec,
        "seed": seed,
    }
    with contextlib.ExitStack() as stack:
        stack.enter_context(_intra_op_threads(threads))
        found = None
        if checkpoint is not None:
            stack.enter_context(checkpoints.locked(checkpoint))
            found = checkpoints.find_checkpoint(checkpoint, run_config)
        rows: list[dict[str, Any]] = []
        if found is not None:
            checkpoints.restore_checkpoint(found, trainer, stream, counted)
            counted.drawn = found.batches_drawn
            rows = list(found.rows)
        else:
            _prepare(trainer, counted, config, n_norm, init_b_dec)
        log_path = Path(log) if log is not None else None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        every = checkpoint_every or eval_every
        first = trainer.n_training_steps + 1
        bar = tqdm(
            total=steps,
            initial=first - 1,
            desc=f"training {config.architecture()} SAE",
            disable=not progress,
        )
        for step in range(first, steps + 1):
            trainer.maybe_reset_sparsity()
            out = trainer.step(next(counted))
            trainer.n_training_steps += 1
            bar.update(1)
            if eval_acts is not None and (step % eval_every == 0 or step == steps):
                row = {
                    "step": step,
                    "samples": trainer.n_training_samples,
                    "loss": float(out.loss.item()),
                    "lr": trainer.optimizer.param_groups[0]["lr"],
                    "trainer_dead": int(trainer.dead_neurons.sum()),
                    **evaluate_sae(inference_view(trainer), eval_acts),
                }
                rows.append(row)
                bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}")
                if log_path is not None:
                    with log_path.open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row) + "\n")
            if checkpoint is not None and (step % every == 0 or step == steps):
                checkpoints.save_checkpoint(
                    checkpoint,
                    trainer,
                    stream,
                    step=step,
                    config=run_config,
                    rows=rows,
                    batches_drawn=counted.drawn,
                )
        bar.close()
    if trainer.activation_scaler.scaling_factor is not None:
        sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
        trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()
    return save_and_reload(sae, output)


def _prepare(trainer: Any, batches: Iterator[Any], config: Any, n_norm: int, init: str) -> None:
    """A fresh run's set-up: the activation-norm estimate (SAELens's scaler, ``n_norm``
    batches) and, for ``init == "mean"``, the decoder bias set to the mean of those batches as
    the SAE sees them (scaled)."""
    scaler = trainer.activation_scaler
    if config.normalize_activations != "expected_average_only_in" and init == "zeros":
        return
    drawn = [next(batches) for _ in range(n_norm)]
    if config.normalize_activations == "expected_average_only_in":
        scaler.estimate_scaling_factor(
            d_in=config.d_in, data_provider=iter(drawn), n_batches_for_norm_estimate=n_norm
        )
    if init == "mean":
        mean = torch.cat(drawn).double().mean(0)
        with torch.no_grad():
            trainer.sae.b_dec.copy_(scaler(mean[None].to(trainer.sae.b_dec))[0])


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (None: unchanged) inside the block."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Counted:
    """An iterator that counts the batches drawn from it (the resume point of a stream that
    cannot save its state)."""

    def __init__(self, batches: Iterator[Any]):
        self.batches, self.drawn = batches, 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        batch = next(self.batches)
        self.drawn += 1
        return batch


def save_and_reload(sae: Any, output: str | Path | None) -> Any:
    """Save a training SAE in SAELens's inference format to ``output`` (a temporary directory
    when None) and load it back with SAELens."""
    if output is not None:
        sae.save_inference_model(str(output))
        return load_sae(output, device=str(sae.device))
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return load_sae(tmp, device=str(sae.device))


def _exact_batches(stream: Iterator[Any], batch_size: int, d_in: int) -> Iterator[Any]:
    """The stream, refusing in one line a batch of another size (SAELens needs exact sizes)."""
    for batch in stream:
        if batch.shape != (batch_size, d_in):
            raise ValueError(
                f"activation batch of shape {tuple(batch.shape)}, expected ({batch_size}, "
                f"{d_in}): SAELens trains on exactly-sized batches (use ActivationStream)"
            )
        yield batch


# ---------------------------------------------------------------------- transcoders
def train_transcoder(
    pairs_stream: Iterator[
        tuple[Float[torch.Tensor, "batch d_in"], Float[torch.Tensor, "batch d_out"]]
    ],
    *,
    d_in: int,
    d_out: int,
    d_sae: int,
    site_in: str,
    site_out: str,
    steps: int,
    l1_coefficient: float = 1e-3,
    lr: float = 1e-3,
    eval_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int = 100,
    log: str | Path | None = None,
    output: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Any:
    """Train a ReLU transcoder ``site_in -> site_out`` (loss ``mean ||y - y_hat||^2 +
    l1_coefficient * mean sum_i f_i ||W_dec,i||``) on ``(x, y)`` batches; evaluation rows
    (output FVU, L0, dead, dense) are appended to ``log``. Saved in SAELens's ``transcoder``
    format (``cfg.metadata.hook_name`` = ``site_in``, ``hook_name_out`` = ``site_out``) and
    returned as loaded by SAELens."""
    require_sae_lens()
    from sae_lens.saes import Transcoder, TranscoderConfig
    from sae_lens.saes.sae import SAEMetadata
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    cfg = TranscoderConfig(
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=site_in, hook_name_out=site_out),
    )
    tc = Transcoder(cfg)
    with torch.no_grad():
        tc.W_dec.mul_(0.1 / tc.W_dec.norm(dim=-1, keepdim=True))
        tc.W_enc.copy_(torch.randn(d_in, d_sae) / math.sqrt(d_in))
    opt = torch.optim.Adam(tc.parameters(), lr=lr)
    log_path = Path(log) if log is not None else None
    bar = tqdm(total=steps, desc="training transcoder", disable=not progress)
    for step in range(1, steps + 1):
        x, y = next(pairs_stream)
        f = tc.encode(x)
        loss = (tc.decode(f) - y).pow(2).sum(-1).mean()
        loss = loss + l1_coefficient * (f * tc.W_dec.norm(dim=-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
        if eval_pairs is not None and (step % eval_every == 0 or step == steps):
            with torch.no_grad():
                ex, ey = eval_pairs
                ef = tc.encode(ex)
                row = {
                    "step": step,
                    "loss": float(loss),
                    **reconstruction_metrics(ey, tc.decode(ef), ef),
                }
            bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}")
            if log_path is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with log_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
    bar.close()
    if output is not None:
        tc.save_model(str(output))
        return load_sae(output)
    with tempfile.TemporaryDirectory() as tmp:
        tc.save_model(tmp)
        return load_sae(tmp)


__all__ = [
    "DENSE_FRACTION",
    "evaluate_sae",
    "inference_view",
    "reconstruction_metrics",
    "save_and_reload",
    "train_sae",
    "train_transcoder",
]
