"""Retrieval evaluation for SearchMemory: corpus, metrics, fusion, BM25 baseline, report."""
