"""The embedding model: networks, pretrained weights, model specs (resolve), checkpoints,
embedding, export."""
