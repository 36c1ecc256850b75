"""Data-only package: the assets of mechir's embedded demo (no code).

``model/`` holds a float16 BERT cross-encoder with its model card; ``scifact-quick/`` holds a
small SciFact test collection under its own licence (see ``README.md`` in each folder). Load them
with ``mechir.load_cross_encoder("demo")`` and ``mechir.data.load_collection("demo")``.
"""
