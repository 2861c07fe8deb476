"""The embedding model: networks, pretrained weights, checkpoints, embedding, export."""
