"""What DeBERTa adds to the shared family tests (``tests/families/test_parity.py``,
``test_analyses.py`` run every DeBERTa-v2 and DeBERTa check there too), each against an oracle
outside mechir where one exists: Hugging Face's own relative-position builder, attention
probabilities and position-bias function (with one term dropped), for the disentangled attention
and its three score terms; the config variants of both versions; AtP* on queries and keys; path
patching; bf16; refusals; and, slow, the five studies, PyTerrier and torchrun."""

from __future__ import annotations

import sys

import pytest
import torch

from mechir import load_cross_encoder
from mechir.hooks import site_hooks
from mechir.models import deberta
from mechir.models.registry import family_of
from tests.families.builders import load_hf, save_tiny_family
from tests.helpers import DOCUMENTS, QUERIES

ATOL = 1e-5

#: Config variants of each version (the defaults are DeBERTa-v3's settings, see builders.py).
VARIANTS = {
    "v3": ("deberta-v2", {}),
    "v2-absolute": (
        "deberta-v2",
        dict(
            position_biased_input=True, type_vocab_size=2, embedding_size=16,
            share_att_key=False, position_buckets=-1, max_relative_positions=6,
            norm_rel_ebd="none",
        ),
    ),
    "v2-c2p": ("deberta-v2", dict(pos_att_type=["c2p"], share_att_key=False)),
    "v2-p2c": ("deberta-v2", dict(pos_att_type=["p2c"])),
    "v2-content-only": (
        "deberta-v2", dict(relative_attention=False, position_biased_input=True),
    ),
    "v1": ("deberta", {}),
    "v1-absolute": (
        "deberta", dict(position_biased_input=True, type_vocab_size=2, max_relative_positions=-1),
    ),
    "v1-c2p": ("deberta", dict(pos_att_type=["c2p"])),
}  # fmt: skip


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    cache: dict[str, object] = {}

    def get(variant: str):
        if variant not in cache:
            name, overrides = VARIANTS[variant]
            cache[variant] = save_tiny_family(name, tmp_path_factory.mktemp(variant), **overrides)
        return cache[variant]

    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, variant_dirs):
    """``(variant, hooked model, HF model, padded batch)``."""
    directory = variant_dirs(request.param)
    model = load_cross_encoder(directory, device="cpu")
    hf = load_hf(VARIANTS[request.param][0], directory)
    return request.param, model, hf, model.encode(QUERIES, DOCUMENTS)


@pytest.fixture(scope="module")
def v3(variant_dirs):
    directory = variant_dirs("v3")
    model = load_cross_encoder(directory, device="cpu")
    return model, load_hf("deberta-v2", directory), model.encode(QUERIES, DOCUMENTS)


def hf_run(hf, batch, **kwargs):
    with torch.no_grad():
        return hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            token_type_ids=batch.token_type_ids,
            **kwargs,
        )


def hf_module(hf):
    return sys.modules[type(hf).__module__]


# ------------------------------------------------------------------ positions
@pytest.mark.parametrize(
    "n_query,n_key,buckets,max_position",
    [(70, 70, 8, 64), (600, 600, 256, 512), (1, 40, 8, 64), (30, 30, -1, 6), (20, 20, -1, 512)],
)
def test_relative_rows_equal_hf(n_query, n_key, buckets, max_position):
    """c2p/p2c rows = HF's ``clamp(build_relative_position +- ... + span)`` (log buckets as
    DeBERTa-v3 with 256 buckets over 512 positions, and the tiny ones); fewer queries than keys
    (``run_block(cls_only=True)``) read the first rows of the square case."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    span = buckets if buckets > 0 else max_position
    n = max(n_query, n_key)
    x = torch.empty(1, n, 1)
    rel = build_relative_position(x, x, bucket_size=buckets, max_position=max_position)[0]
    hf_c2p = torch.clamp(rel + span, 0, 2 * span - 1)
    hf_p2c = torch.clamp(-rel + span, 0, 2 * span - 1)  # HF's p2c_pos, indexed [key, query]
    c2p, p2c = deberta.relative_position_index(
        n_query, n_key, span=span, buckets=buckets, max_position=max_position
    )
    assert torch.equal(c2p, hf_c2p[:n_query, :n_key])
    assert torch.equal(p2c, hf_p2c[:n_key, :n_query])
    if buckets > 0 and n > buckets:  # the log buckets compress far distances
        assert c2p.max() < span + n - 1 and len(c2p[0].unique()) < n_key


def test_log_buckets_equal_hf():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    rel = torch.arange(-700, 701)
    for size, most in ((256, 512), (8, 64), (32, 128)):
        expected = make_log_bucket_position(rel, size, most).long()
        assert torch.equal(deberta.log_bucket_position(rel, size, most), expected)


# ------------------------------------------------------------------ parity of every variant
def test_variant_hidden_states_patterns_and_scores_equal_hf(variant):
    """Every layer's output, every attention pattern (real query rows) and the score."""
    name, model, hf, batch = variant
    out = hf_run(hf, batch, output_hidden_states=True, output_attentions=True)
    names = ["hook_full_embed"] + [model.block_output_name(i) for i in range(model.cfg.n_layers)]
    patterns = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            batch, return_type="logits", names_filter=names + patterns
        )
    real = batch.attention_mask.bool()
    for i, hook in enumerate(names):
        torch.testing.assert_close(cache[hook][real], out.hidden_states[i][real], atol=ATOL, rtol=0)
    for i, hook in enumerate(patterns):
        got, want = cache[hook].transpose(1, 2)[real], out.attentions[i].transpose(1, 2)[real]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    alone = torch.cat([model.score(batch[i]) for i in range(len(batch))])
    torch.testing.assert_close(model.score(batch), alone, atol=ATOL, rtol=0)


def test_variant_structure(variant):
    """Each variant builds what its config says: position/token-type embeddings, projection,
    per-layer position projections, the term hooks."""
    name, model, hf, _ = variant
    config, attn = hf.config, model.blocks[0].attn
    assert model.family is family_of(config.model_type)
    assert hasattr(model.embed, "pos_embed") == bool(config.position_biased_input)
    assert hasattr(model.embed, "token_type_embed") == (config.type_vocab_size > 0)
    assert model.embed.projected == (getattr(config, "embedding_size", 32) != 32)
    kinds = set(config.pos_att_type) if config.relative_attention else set()
    hooks = {h for h in ("c2p", "p2c") if f"blocks.0.attn.hook_{h}_scores" in model.hook_dict}
    assert hooks == kinds
    shared = getattr(config, "share_att_key", False)
    assert hasattr(attn, "W_K_pos") == ("c2p" in kinds and not shared)
    assert hasattr(attn, "W_Q_pos") == ("p2c" in kinds and not shared)
    assert hasattr(model, "rel_embed") == bool(config.relative_attention)
    factor = (
        1 + len(config.pos_att_type)
        if config.model_type == "deberta"
        else 1 + len({"c2p", "p2c"} & set(config.pos_att_type))
    )
    assert attn.attn_scale == pytest.approx((model.cfg.d_head * factor) ** 0.5)


# ------------------------------------------------------------------ the three score terms
def test_terms_sum_to_the_total(v3):
    model, _, batch = v3
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: "_scores" in n)
    real = batch.attention_mask.bool()[:, None, None, :]
    for layer in range(model.cfg.n_layers):
        pre = f"blocks.{layer}.attn.hook_"
        total = sum(cache[pre + t] for t in ("c2c_scores", "c2p_scores", "p2c_scores"))
        scores = cache[pre + "attn_scores"]
        torch.testing.assert_close(
            scores.masked_select(real), total.masked_select(real.expand_as(total))
        )
        assert (scores.masked_select(~real) == -torch.inf).all()


def _hf_bias_keeping(hf, keep):
    """HF's position-bias method restricted to the terms in ``keep`` (the scale unchanged)."""
    cls = hf_module(hf).DisentangledSelfAttention
    name = (
        "disentangled_attention_bias"
        if hasattr(cls, "disentangled_attention_bias")
        else ("disentangled_att_bias")
    )
    original = getattr(cls, name)

    def bias(self, *args, **kwargs):
        saved = self.pos_att_type
        self.pos_att_type = [t for t in saved if t in keep]
        try:
            return original(self, *args, **kwargs) if self.pos_att_type else 0
        finally:
            self.pos_att_type = saved

    return cls, name, bias


@pytest.mark.parametrize("zeroed", [("c2p",), ("p2c",), ("c2p", "p2c")])
@pytest.mark.parametrize("which", ["v3", "v1"])
def test_zeroing_a_term_equals_hf_without_it(variant_dirs, monkeypatch, which, zeroed):
    """Zeroing ``hook_c2p_scores`` (``hook_p2c_scores``) in every layer = HF computing its
    position bias without that term: each hook holds exactly its term."""
    directory = variant_dirs(which)
    model = load_cross_encoder(directory, device="cpu")
    hf = load_hf(VARIANTS[which][0], directory)
    batch = model.encode(QUERIES, DOCUMENTS)
    cls, name, bias = _hf_bias_keeping(hf, {"c2p", "p2c"} - set(zeroed))
    monkeypatch.setattr(cls, name, bias)
    expected = hf_run(hf, batch).logits[:, 0]
    hooks = [
        (f"blocks.{layer}.attn.hook_{term}_scores", lambda act, hook: torch.zeros_like(act))
        for layer in range(model.cfg.n_layers)
        for term in zeroed
    ]
    got = model.score(batch, hooks=hooks)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-3), "the term had no effect"


def test_position_terms_reproduce_the_term_hooks(v3):
    """:func:`deberta.position_terms` (vectors in the residual stream) give the c2p/p2c hooks
    from the block input alone."""
    model, _, batch = v3
    with torch.no_grad():
        _, cache = model.run_with_cache(batch)
    n = batch.input_ids.shape[1]
    shape = model.blocks[0].attn.deberta
    c2p, p2c = deberta.relative_position_index(
        n, n, span=shape.span, buckets=shape.buckets, max_position=shape.max_relative_positions
    )
    for layer in range(model.cfg.n_layers):
        x = cache[f"blocks.{layer}.hook_resid_pre"]
        terms = deberta.position_terms(model, layer)
        s = model.blocks[layer].attn.attn_scale
        by_row = torch.einsum("bim,hrm->bhir", x, terms["c2p_query"]) + terms["c2p_bias"][:, None]
        got = torch.gather(by_row, -1, c2p[None, None].expand(*by_row.shape[:3], -1)) / s
        want = cache[f"blocks.{layer}.attn.hook_c2p_scores"]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        by_row = torch.einsum("bjm,hrm->bhjr", x, terms["p2c_key"]) + terms["p2c_bias"][:, None]
        got = torch.gather(by_row, -1, p2c[None, None].expand(*by_row.shape[:3], -1))
        want = cache[f"blocks.{layer}.attn.hook_p2c_scores"]
        torch.testing.assert_close(got.transpose(-1, -2) / s, want, atol=ATOL, rtol=0)


def test_position_terms_refuse_other_families(family_dirs):
    model = load_cross_encoder(family_dirs("bert"), device="cpu")
    with pytest.raises(ValueError, match="BERT has no disentangled attention"):
        deberta.position_terms(model, 0)


def test_every_hook_point_has_the_batch_axis(v3):
    """No hook point holds an input-independent tensor (the position projections have none), so
    caches, patching and ``remove_batch_dim`` see a batch axis everywhere."""
    model, _, batch = v3
    with torch.no_grad():
        _, cache = model.run_with_cache(batch[:3])
    optional = ("_input", "hook_mlp_in", "hook_result")  # TransformerLens's opt-in hooks
    assert set(cache.keys()) == {n for n in model.hook_dict if not n.endswith(optional)}
    assert all(act.shape[0] == 3 for act in cache.values())


def test_term_sites(v3, family_dirs):
    """The term sites (``c2p_scores``, ...) select heads and parts like any attention site:
    zeroing c2p of head 0/2 from query rows to document keys = doing it by hand; ``mean`` is
    not defined on a term; a family without the term has no such hook point."""
    from mechir import Part
    from mechir.hooks.site import SITES, action_for

    model, _, batch = v3
    site = SITES["c2p_scores"]
    parts = {"position": "query", "key": "document"}
    action = action_for(site, "zero")
    got = model.score(
        batch, hooks=site_hooks(model, site, action=action, units=["0/2"], parts=parts)
    )

    def by_hand(act, hook):
        rows = (batch.parts == int(Part.QUERY))[:, :, None]
        keys = (batch.parts == int(Part.DOCUMENT))[:, None, :]
        act = act.clone()
        act[:, 2] = act[:, 2].masked_fill(rows & keys, 0.0)
        return act

    expected = model.score(batch, hooks=[("blocks.0.attn.hook_c2p_scores", by_hand)])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-4)
    with pytest.raises(ValueError, match="mode 'mean' is not defined for p2c_scores"):
        action_for(SITES["p2c_scores"], "mean")
    bert = load_cross_encoder(family_dirs("bert"), device="cpu")
    with pytest.raises(ValueError, match="no hook point 'blocks.0.attn.hook_c2p_scores'"):
        bert.score(batch, hooks=site_hooks(bert, site, action=action, layers=[0]))


# ------------------------------------------------------------------ blocks, patching
def test_cls_only_last_block_equals_the_full_block(v3):
    model, _, batch = v3
    last = model.cfg.n_layers - 1
    with torch.no_grad():
        resid = model(batch, stop_at_layer=last)
        mask = model.additive_attention_mask(batch.attention_mask)
        with model.running_on(batch):
            full = model.run_block(last, resid, mask)
            cls = model.run_block(last, resid, mask, cls_only=True)
            score = model.score_from_resid(cls)
    assert cls.shape[1] == 1
    torch.testing.assert_close(cls, full[:, :1], atol=ATOL, rtol=0)
    torch.testing.assert_close(score, model.score(batch), atol=ATOL, rtol=0)


def test_path_patching_batched_equals_reference(v3):
    """Split q/k/v inputs (TransformerLens ``use_split_qkv_input``) reach the position terms."""
    from patching import path_patch, path_patch_reference, split_qkv_input
    from tests.families.test_analyses import corrupted_pairs

    model, _, batch = v3
    with split_qkv_input(model):
        split = model.score(batch)
    torch.testing.assert_close(split, model.score(batch), atol=ATOL, rtol=0)
    pairs = corrupted_pairs(model, batch)
    kwargs = dict(receivers=["1/1", "1/2"], channels="qk")
    fast = path_patch(model, pairs, batch_size=3, **kwargs)
    ref = path_patch_reference(model, pairs, **kwargs)
    torch.testing.assert_close(fast.patched, ref.patched, atol=ATOL, rtol=0, equal_nan=True)
    assert (fast.patched[:, 0].nan_to_num() - fast.corrupted[:, None]).abs().max() > 1e-3


def _affine(ln):
    """A LayerNorm that keeps its centring and weight but not its (nonlinear) scaling."""
    return lambda x: (x - x.mean(-1, keepdim=True)) * ln.w + ln.b


def test_atp_star_on_queries_and_keys_is_exact_on_a_linear_tail(variant_dirs):
    """AtP* recomputes the softmax with the score change of a patched q or k, which in DeBERTa
    includes the c2p (query) or p2c (key) term: exact when the score is affine in the last
    layer's pattern; without the position terms in the change it is not."""
    from patching import attribution_patch, patch_sweep, qk_target
    from tests.families.test_analyses import corrupted_pairs

    model = load_cross_encoder(variant_dirs("v3"), device="cpu")
    last = model.blocks[-1]
    for ln in (last.ln1, last.ln2):
        ln.forward = _affine(ln)
    last.mlp.act_fn = lambda x: x
    model.pooler.activation = torch.nn.Identity()
    pairs = corrupted_pairs(model, model.encode(QUERIES, DOCUMENTS))
    targets = (qk_target("k", heads=["1/0", "1/1"]), qk_target("q", by="part", heads=["1/3"]))
    for target in targets:
        exact = patch_sweep(model, pairs, target)
        approx = attribution_patch(model, pairs, target, batch_size=3)
        scale = max(1.0, float(exact.patched.nan_to_num().abs().max()))
        torch.testing.assert_close(
            approx.patched, exact.patched, atol=1e-5 * scale, rtol=0, equal_nan=True
        )
        effect = exact.patched - exact.corrupted.view(-1, *[1] * (exact.patched.dim() - 1))
        assert effect.nan_to_num().abs().max() > 1e-2
        last.attn.qk_score_delta = None  # content term only: the estimate is off
        try:
            content_only = attribution_patch(model, pairs, target, batch_size=3)
        finally:
            del last.attn.qk_score_delta
        assert (content_only.patched - exact.patched).nan_to_num().abs().max() > 1e-4 * scale


def test_guided_top_cells_are_the_sweeps_top_cells(v3):
    """Guided patching on DeBERTa-v3 (heads x part, and keys: AtP* bounds with the p2c term):
    verified cells hold the sweep's exact score changes; with a wide safety margin the top 3
    of each pair is the sweep's top 3; 'certified' only where every cell was patched exactly."""
    from patching import head_target, patch_sweep, patch_top_cells, qk_target
    from tests.families.test_analyses import corrupted_pairs

    model, _, batch = v3
    pairs = corrupted_pairs(model, batch[:3])
    for target in (head_target(by="part"), qk_target("k", heads=["1/0", "1/1", "1/2"])):
        top = patch_top_cells(model, pairs, target, k=3, rtol=10.0, progress=False)
        sweep = patch_sweep(model, pairs, target, progress=False)
        shape = (-1, *[1] * (sweep.patched.dim() - 1))
        effect = (sweep.patched - sweep.corrupted.view(shape)).nan_to_num()
        for i in range(len(pairs)):
            verified, valid = top.verified[i], ~sweep.patched[i].isnan()  # NaN: no such cell
            assert bool(top.certified[i]) == bool((verified | ~valid).all())
            assert verified.any()
            torch.testing.assert_close(
                top.exact[i][verified], effect[i][verified], atol=ATOL, rtol=0
            )
            best = effect[i].abs().flatten().topk(3).indices
            assert top.top[i].tolist() == best.tolist(), (target, i)


# ------------------------------------------------------------------ dtype, refusals
def test_bf16_on_cpu(variant_dirs):
    """bf16 weights and activations: scores near fp32 (bf16 keeps ~3 significant digits), as
    near as Hugging Face's own bf16 run is, within a small margin."""
    directory = variant_dirs("v3")
    fp32 = load_cross_encoder(directory, device="cpu")
    bf16 = load_cross_encoder(directory, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    batch = fp32.encode(QUERIES, DOCUMENTS)
    reference = fp32.score(batch)
    got = bf16.score(batch)
    hf = load_hf("deberta-v2", directory).to(torch.bfloat16)
    hf_error = (hf_run(hf, batch).logits[:, 0].float() - reference).abs().max()
    scale = max(1.0, float(reference.abs().max()))
    assert (got - reference).abs().max() <= max(0.05 * scale, 2 * hf_error)


@pytest.mark.parametrize(
    "attribute,value,message",
    [
        ("conv_kernel_size", 3, "conv_kernel_size 3 .*convolution"),
        ("pooler_hidden_size", 16, "pooler_hidden_size 16 != hidden_size 32"),
        ("hidden_act", "tanh", "hidden_act 'tanh'"),
        ("pooler_hidden_act", "sigmoid", "pooler_hidden_act 'sigmoid'"),
        ("attention_head_size", 4, "attention_head_size 4 with 4 heads"),
    ],
)
def test_unsupported_settings_are_one_line_errors(v3, attribute, value, message):
    model, hf, _ = v3
    config = hf.config.__class__.from_dict(hf.config.to_dict())
    setattr(config, attribute, value)
    with pytest.raises(ValueError, match=message) as error:
        deberta.dimensions(config)
    assert "\n" not in str(error.value) and "mechir does not support it" in str(error.value)


def test_talking_heads_are_refused(variant_dirs):
    hf = load_hf("deberta", variant_dirs("v1"))
    hf.config.talking_head = True
    tok = load_cross_encoder(variant_dirs("v1"), device="cpu").tokenizer
    with pytest.raises(ValueError, match="talking_head"):
        load_cross_encoder(hf, tokenizer=tok, device="cpu")


def test_prompt_options_are_refused(variant_dirs):
    with pytest.raises(ValueError, match="template: DeBERTa-v2 reads no prompt"):
        load_cross_encoder(variant_dirs("v3"), device="cpu", template="{query} {document}")


def test_tokenizer_is_deberta_v3s_own_class(v3):
    model, _, batch = v3
    assert type(model.tokenizer).__name__ == "DebertaV2Tokenizer"
    assert model.tokenizer.cls_token_id == 1 and model.tokenizer.sep_token_id == 2
    assert model.max_length == 64 and model.family.name == "DeBERTa-v2"
    assert batch.token_type_ids.any()  # the tokenizer's types, ignored (type_vocab_size 0)


# ------------------------------------------------------------------ studies, PyTerrier, torchrun
@pytest.mark.slow
def test_the_five_studies_run(variant_dirs, tmp_path):
    from tests.analyses.conftest import common_options, run_the_five_studies, write_tiny_collection

    collection = write_tiny_collection(tmp_path / "col")
    argv = common_options(variant_dirs("v3"), collection)
    run_the_five_studies(argv, collection, tmp_path, ["--conditions", "query_to_document"])


@pytest.mark.slow
def test_pyterrier_reranker_scores_equal_the_model(v3):
    pt = pytest.importorskip("pyterrier", reason="python-terrier not installed")
    import pandas as pd

    from mechir.hooks import head_knockout_hooks
    from mechir.pyterrier import MechirReranker

    model, _, _ = v3
    frame = pd.DataFrame(
        {
            "qid": ["1", "1", "2", "2"],
            "query": [QUERIES[0], QUERIES[0], QUERIES[1], QUERIES[1]],
            "docno": ["a", "b", "c", "d"],
            "text": DOCUMENTS[:4],
        }
    )
    hooks = head_knockout_hooks(model, heads=["0/1", "1/2"])
    for hook_list in (None, hooks):
        out = MechirReranker(model, hooks=hook_list).transform(frame)
        batch = model.encode(list(frame["query"]), list(frame["text"]))
        expected = model.score(batch, hooks=hook_list)
        got = torch.tensor(out.set_index("docno").loc[list(frame.docno), "score"].to_numpy())
        torch.testing.assert_close(got.float(), expected, atol=ATOL, rtol=0)
    assert pt is not None


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(variant_dirs, tmp_path):
    from tests.analyses.conftest import write_tiny_collection
    from tests.test_cli import rerank_argv
    from tests.test_cli_distributed import assert_same_rerank, run_both

    collection = write_tiny_collection(tmp_path / "col", n_queries=5, depth=4)
    model = variant_dirs("v3")
    one, two = run_both(lambda out: rerank_argv(model, collection, out), tmp_path)
    assert_same_rerank(one, two)
