from __future__ import annotations

import pytest
import torch

from mechir.attribution import (
    GroupedMeans,
    StreamingMean,
    mean_neuron_attributions,
    neuron_integrated_gradients,
    pair_batches,
)
from mechir.data import Pair
from tests.helpers import DOCUMENTS, QUERIES


def test_streaming_mean_matches_the_full_mean():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(23, 3, 5, generator=gen) * 100 + 7
    acc = StreamingMean()
    for chunk in values.split(4):
        acc.update(chunk)
    assert acc.count == 23
    torch.testing.assert_close(acc.mean, values.mean(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(acc.std, values.std(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc.sum, values.sum(0), rtol=1e-6, atol=1e-3)
    other = StreamingMean()
    other.update(values[:5])
    merged = StreamingMean().merge(other)
    merged.update(values[5:])
    torch.testing.assert_close(merged.mean, acc.mean)


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
def test_streaming_mean_errors():
    acc = StreamingMean()
    with pytest.raises(ValueError, match="no values"):
        _ = acc.mean
    acc.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="differs from the running"):
        acc.update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="leading example dimension"):
        acc.update(torch.tensor(1.0))


def test_grouped_means():
    values = torch.arange(12.0).view(6, 2)
    keys = ["rel", "non", "rel", "rel", "non", "rel"]
    grouped = GroupedMeans()
    grouped.update(values[:3], keys[:3])
    grouped.update(values[3:], keys[3:])
    assert grouped.counts == {"rel": 4, "non": 2}
    torch.testing.assert_close(grouped["rel"].mean, values[[0, 2, 3, 5]].mean(0))
    torch.testing.assert_close(grouped["non"].mean, values[[1, 4]].mean(0))
    with pytest.raises(ValueError, match="3 group keys for 2 examples"):
        grouped.update(values[:2], ["a", "b", "c"])


def test_mean_neuron_attributions_streams_pairs_by_group(tiny):
    model, _, _ = tiny
    pairs = [Pair(f"q{i}", f"d{i}", q, d) for i, (q, d) in enumerate(zip(QUERIES, DOCUMENTS))]
    group_of = {"q0": "relevant", "q1": "non_relevant", "q2": "relevant", "q3": "relevant"}
    kwargs = dict(n_steps=3, path="activation")
    means = mean_neuron_attributions(
        model,
        pair_batches(model, pairs, group_of=lambda p: group_of[p.qid], batch_size=3, max_length=64),
        **kwargs,
    )
    assert means.means.counts == {"relevant": 3, "non_relevant": 1}
    assert means.layers == [0, 1]
    # the same as attributing every pair at once and averaging
    full = neuron_integrated_gradients(
        model, model.encode(QUERIES, DOCUMENTS, max_length=64), **kwargs
    )
    torch.testing.assert_close(
        means.mean("relevant"), full.attributions[[0, 2, 3]].mean(0), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(means.mean("non_relevant"), full.attributions[1])
    assert means.completeness.count == 4
    torch.testing.assert_close(
        means.completeness.mean, full.unexplained.abs().mean(0), rtol=1e-4, atol=1e-6
    )
    # the error estimate and the selection stability are averaged per example too
    torch.testing.assert_close(means.error.mean, full.relative_error()[:, None].mean(0))
    torch.testing.assert_close(means.overlap.mean, full.selection_overlap(0.5)[:, None].mean(0))
    assert means.points.count == 4 and float(means.points.mean) == 3
