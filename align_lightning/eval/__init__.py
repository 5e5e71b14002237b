"""Evaluation metrics computed from embeddings."""

from align_lightning.eval.retrieval import retrieval_metrics
from align_lightning.eval.zeroshot import IMAGENET_TEMPLATES, topk_accuracy, zeroshot_classifier

__all__ = ["IMAGENET_TEMPLATES", "retrieval_metrics", "topk_accuracy", "zeroshot_classifier"]
