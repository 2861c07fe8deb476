"""The gallery index: FAISS vectors with stable ids, metadata, manifest, journal, shards."""
