"""Retrieval evaluation: metrics, protocols, reports and their pictures."""
