"""Evaluation: metrics computed from embeddings, and the callbacks that run them during training and evaluation."""

from align_lightning.eval.callbacks import EvaluationCallback, RetrievalEvalCallback, ZeroShotEvalCallback, embed_batch
from align_lightning.eval.retrieval import retrieval_metrics
from align_lightning.eval.zeroshot import IMAGENET_TEMPLATES, topk_accuracy, zeroshot_classifier

__all__ = [
    "IMAGENET_TEMPLATES",
    "EvaluationCallback",
    "RetrievalEvalCallback",
    "ZeroShotEvalCallback",
    "embed_batch",
    "retrieval_metrics",
    "topk_accuracy",
    "zeroshot_classifier",
]
