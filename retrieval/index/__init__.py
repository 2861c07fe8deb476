"""The gallery index, one module per idea (nothing is imported here: import from the modules).

- :mod:`~retrieval.index.gallery`: :class:`~retrieval.index.gallery.GalleryIndex`, vectors
  with stable ids and their metadata: build, add, remove, search, commit, save, load;
- :mod:`~retrieval.index.knn`: the one exact k-nearest-neighbour search (also the
  evaluation's), its ``D, I`` convention and its tie rule;
- :mod:`~retrieval.index.factory`: index types (FAISS factory strings, ``auto``), families,
  training, search parameters;
- :mod:`~retrieval.index.build`: building an index part by part;
- :mod:`~retrieval.index.snapshot`: the snapshot files, written and read back with their checks;
- :mod:`~retrieval.index.manifest`: the folder's file names and manifest (no FAISS needed);
- :mod:`~retrieval.index.journal`: the write-ahead journal and its repair (no FAISS needed);
- :mod:`~retrieval.index.lock`: the writer lock between processes;
- :mod:`~retrieval.index.shards`: an index from the shards of ``retrieval embed --shards``.
"""
