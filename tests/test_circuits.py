"""QK circuits: thin SVD vs explicit SVD, alignment vs the trace oracle, directions, bias terms."""

from __future__ import annotations

import pytest
import torch

from mechir import circuits
from mechir.parts import PARTS, Part
from tests.helpers import SHARED_MODEL, requires_shared, tiny_cross_encoder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Tiny random model with d_head = 8 (d_model 32, 4 heads) and non-zero Q/K biases."""
    hooked, _, _ = tiny_cross_encoder(tmp_path_factory.mktemp("circuits"), seed=3)
    return hooked


def _w_qk(model) -> torch.Tensor:
    return model.W_Q.detach().double() @ model.W_K.detach().double().transpose(-2, -1)


def test_factored_svd_reconstructs_w_qk_with_orthonormal_factors(model):
    svd = circuits.qk_svd(model, dtype=torch.float64)
    d_head = model.cfg.d_head
    assert svd.U.shape == (2, 4, 32, d_head) and svd.S.shape == (2, 4, d_head)
    recon = svd.U @ torch.diag_embed(svd.S) @ svd.V.transpose(-2, -1)
    torch.testing.assert_close(recon, _w_qk(model), rtol=0, atol=1e-10)
    eye = torch.eye(d_head, dtype=torch.float64).expand(2, 4, d_head, d_head)
    torch.testing.assert_close(svd.U.transpose(-2, -1) @ svd.U, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(svd.V.transpose(-2, -1) @ svd.V, eye, rtol=0, atol=1e-10)
    assert (svd.S[..., :-1] >= svd.S[..., 1:]).all()
    # sign convention: the largest-magnitude entry of every u_k is positive
    peak = torch.gather(svd.U, -2, svd.U.abs().argmax(-2, keepdim=True))
    assert (peak > 0).all()


def test_alignment_equals_trace_oracle_for_every_head(model):
    table = circuits.qk_alignment(model, dtype=torch.float64)
    trace = (model.W_Q.detach().double() * model.W_K.detach().double()).sum((-2, -1))
    assert list(table["label"]) == [f"{a}/{b}" for a in range(2) for b in range(4)]
    torch.testing.assert_close(
        torch.tensor(table["alignment"].to_numpy()), trace.reshape(-1), rtol=1e-10, atol=1e-10
    )
    # the default float32 path agrees with the oracle too
    table32 = circuits.qk_alignment(model)
    torch.testing.assert_close(
        torch.tensor(table32["alignment"].to_numpy()).double(),
        trace.reshape(-1),
        rtol=1e-4,
        atol=1e-4,
    )


def test_scores_match_explicit_svd_of_materialised_matrix(model):
    """Every score against ``torch.linalg.svd`` of each materialised d_model x d_model matrix,
    computed here (not with the library's reference) and compared sign-invariantly."""
    k = 3
    table = circuits.qk_alignment(model, k=k, dtype=torch.float64)
    w_qk = _w_qk(model)
    for row in table.itertuples():
        u, s, vh = torch.linalg.svd(w_qk[row.layer, row.head])
        cos = (u * vh.T).sum(0)  # u_k . v_k: invariant to the joint flip (u_k, v_k) -> -(u_k, v_k)
        s, cos = s[: model.cfg.d_head], cos[: model.cfg.d_head]  # the rest are ~0
        expected = {
            "sigma_1": s[0],
            "sigma_sum": s.sum(),
            "alignment": (s * cos).sum(),
            "alignment_pos": (s * cos.clamp(min=0)).sum(),
            "alignment_pos_norm": (s * cos.clamp(min=0)).sum() / s.sum(),
            "alignment_norm": (s * cos).sum() / s.sum(),
            "alignment_topk": (s[:k] * cos[:k]).sum(),
            "alignment_pos_topk": (s[:k] * cos[:k].clamp(min=0)).sum(),
            "alignment_pos_topk_norm": (s[:k] * cos[:k].clamp(min=0)).sum() / s[:k].sum(),
            "alignment_topk_norm": (s[:k] * cos[:k]).sum() / s[:k].sum(),
        }
        for name, value in expected.items():
            assert getattr(row, name) == pytest.approx(float(value), rel=1e-8, abs=1e-10), name
        assert row.rank == model.cfg.d_head and row.k == k


def test_fast_svd_agrees_with_library_reference(model):
    fast, ref = circuits.qk_svd(model), circuits.qk_svd_reference(model)
    torch.testing.assert_close(fast.S, ref.S, rtol=1e-5, atol=1e-5)
    # rank-1 terms S_k u_k v_k^T are sign-invariant; singular values of a random model are distinct
    outer = lambda svd: svd.U[..., :, None, :] * svd.V[..., None, :, :]  # noqa: E731
    torch.testing.assert_close(outer(fast), outer(ref), rtol=1e-3, atol=1e-4)


def test_top_k_and_errors(model):
    svd = circuits.qk_svd(model)
    top = svd.top(2)
    assert top.U.shape[-1] == top.S.shape[-1] == top.V.shape[-1] == 2
    with pytest.raises(ValueError, match="exceeds the rank of W_QK.*d_head=8"):
        circuits.qk_alignment(model, k=9)
    with pytest.raises(ValueError, match="positive int"):
        svd.top(0)
    with pytest.raises(ValueError, match="layer 2 out of range"):
        circuits.singular_direction_tokens(model, "2/0")
    with pytest.raises(ValueError, match="head 4 out of range"):
        circuits.singular_direction_tokens(model, (0, 4))
    with pytest.raises(ValueError, match="k=8 out of range"):
        circuits.singular_direction_tokens(model, "0/0", 8)


def test_bias_terms_explain_the_attention_scores(model, tiny_batch):
    """``score * sqrt(d_head) = x_q W_QK x_k + x_k . key_bias + x_q . query_bias + constant``."""
    terms = circuits.qk_bias_terms(model)
    layer = 1
    names = (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_attn_scores")
    with torch.no_grad():
        _, cache = model.run_with_cache(tiny_batch, names_filter=lambda n: n in names)
    x = cache[names[0]].double()  # [batch, pos, d_model]
    scores = cache[names[1]].double() * model.cfg.d_head**0.5  # [batch, head, q, k]
    w_qk = _w_qk(model)[layer]
    bilinear = torch.einsum("bqm,hmn,bkn->bhqk", x, w_qk, x)
    key = torch.einsum("bkm,hm->bhk", x, terms["key_bias"][layer].double())[:, :, None, :]
    query = torch.einsum("bqm,hm->bhq", x, terms["query_bias"][layer].double())[..., None]
    const = terms["constant"][layer].double()[None, :, None, None]
    real = tiny_batch.attention_mask.bool()[:, None, None, :].expand_as(scores)
    torch.testing.assert_close(
        scores[real], (bilinear + key + query + const)[real], rtol=1e-4, atol=1e-4
    )
    # without the key bias the key-varying part is not explained
    assert not torch.allclose(scores[real], (bilinear + query + const)[real], atol=1e-2)


def test_token_embeddings_are_what_layer_zero_sees(model, tiny_batch):
    with torch.no_grad():
        _, cache = model.run_with_cache(tiny_batch, names_filter="hook_full_embed")
    full = cache["hook_full_embed"]
    for b, pos in [(0, 2), (1, 9), (2, 4)]:
        tt = int(tiny_batch.token_type_ids[b, pos])
        emb = circuits.token_embeddings(model, token_type=tt, position=pos)
        torch.testing.assert_close(emb[tiny_batch.input_ids[b, pos]], full[b, pos])
    with pytest.raises(ValueError, match="position 64 out of range"):
        circuits.token_embeddings(model, position=64)


def test_top_tokens_vocabulary_and_batch(model, tiny_batch):
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    unit = direction / direction.norm()
    vocab = circuits.top_tokens(model, direction, n=4)
    proj = circuits.token_embeddings(model) @ unit
    assert list(vocab[vocab.sign == "+"].token_id) == proj.topk(4).indices.tolist()
    assert list(vocab[vocab.sign == "-"].token_id) == (-proj).topk(4).indices.tolist()
    torch.testing.assert_close(
        torch.tensor(vocab[vocab.sign == "+"].projection.to_numpy()), proj.topk(4).values.double()
    )
    layer = 1
    states = circuits.top_tokens(model, direction, n=5, batch=tiny_batch, layer=layer, batch_size=3)
    with torch.no_grad():
        _, cache = model.run_with_cache(tiny_batch)
    resid = cache[f"blocks.{layer}.hook_resid_pre"] @ unit
    resid[~tiny_batch.attention_mask.bool()] = float("nan")  # padding is never a candidate
    best = resid.nan_to_num(nan=-1e9).flatten().topk(5)
    top = states[states.sign == "+"]
    assert list(zip(top.example, top.position)) == [
        divmod(int(i), resid.shape[1]) for i in best.indices
    ]
    torch.testing.assert_close(torch.tensor(top.projection.to_numpy()).float(), best.values)
    assert set(states.part) <= {p.name.lower() for p in PARTS}


def test_singular_direction_tokens_table(model):
    table = circuits.singular_direction_tokens(model, "1/2", 1, n=3)
    assert len(table) == 12  # u/v x +/- x 3
    assert set(table.vector) == {"u", "v"} and (table.label == "1/2").all()
    svd = circuits.qk_svd(model)
    assert table.sigma.iloc[0] == pytest.approx(float(svd.S[1, 2, 1]))
    u_plus = table[(table.vector == "u") & (table.sign == "+")]
    emb = circuits.token_embeddings(model, token_type=0)
    assert u_plus.token_id.iloc[0] == int((emb @ svd.U[1, 2, :, 1]).argmax())


def test_singular_direction_tokens_from_a_batch(model, tiny_batch):
    table = circuits.singular_direction_tokens(model, "1/0", 0, n=2, batch=tiny_batch)
    assert list(table.columns[:6]) == ["layer", "head", "label", "k", "sigma", "vector"]
    svd = circuits.qk_svd(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(tiny_batch, names_filter="blocks.1.hook_resid_pre")
    real = tiny_batch.attention_mask.bool()
    for name, vec in (("u", svd.U[1, 0, :, 0]), ("v", svd.V[1, 0, :, 0])):
        proj = cache["blocks.1.hook_resid_pre"][real] @ vec
        sel = table[table.vector == name]
        assert sel[sel.sign == "+"].projection.iloc[0] == pytest.approx(float(proj.max()), abs=1e-5)
        assert sel[sel.sign == "-"].projection.iloc[0] == pytest.approx(float(proj.min()), abs=1e-5)


def test_part_cosines_match_cached_means(model, tiny_batch):
    table = circuits.singular_direction_part_cosines(
        model, tiny_batch, k=2, heads=["0/1", "1/3"], batch_size=3
    )
    assert list(table.label) == ["0/1", "0/1", "1/3", "1/3"]
    svd = circuits.qk_svd(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(tiny_batch)
    for row in table.itertuples():
        resid = cache[f"blocks.{row.layer}.hook_resid_pre"]
        m_q = resid[tiny_batch.mask(Part.QUERY)].mean(0)
        m_d = resid[tiny_batch.mask(Part.DOCUMENT)].mean(0)
        u, v = svd.U[row.layer, row.head, :, row.k], svd.V[row.layer, row.head, :, row.k]
        cos = torch.nn.functional.cosine_similarity
        assert row.u_query == pytest.approx(float(cos(u, m_q, dim=0)), abs=1e-5)
        assert row.v_document == pytest.approx(float(cos(v, m_d, dim=0)), abs=1e-5)
        assert row.qd == pytest.approx(row.u_query * row.v_document)
    means = circuits.mean_part_residuals(model, tiny_batch, [0], batch_size=2)
    torch.testing.assert_close(
        means[0, PARTS.index(Part.SEP2)],
        cache["blocks.0.hook_resid_pre"][tiny_batch.mask(Part.SEP2)].mean(0),
    )


@pytest.mark.shared
def test_shared_model_alignment_matches_trace():
    requires_shared(SHARED_MODEL)
    from mechir import load_cross_encoder

    model = load_cross_encoder(SHARED_MODEL, device="cpu")
    table = circuits.qk_alignment(model, k=4)
    assert len(table) == 6 * 12 and (table["rank"] == 32).all()
    trace = (model.W_Q.detach().double() * model.W_K.detach().double()).sum((-2, -1))
    torch.testing.assert_close(
        torch.tensor(table["alignment"].to_numpy()).double(),
        trace.reshape(-1),
        rtol=1e-4,
        atol=1e-3,
    )
    assert (table["alignment_pos"] >= table["alignment"] - 1e-4).all()
