"""Data-only package: the assets of mechir's embedded demo (no code).

``model/`` holds a BERT cross-encoder in compact block int16/int17 codes (dequantized to a float32
directory in the cache on first use) with its model card; ``scifact-quick/`` holds a
small SciFact test collection under its own licence (see ``README.md`` in each folder). Load them
with ``mechir.load_cross_encoder("demo")`` and ``mechir.data.load_collection("demo")``.
"""
