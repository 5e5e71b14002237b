"""Evaluation metrics computed from embeddings."""

from align_lightning.eval.retrieval import retrieval_metrics

__all__ = ["retrieval_metrics"]
