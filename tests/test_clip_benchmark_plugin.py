"""Tests for align_lightning/clip_benchmark_plugin.py: CLIP_benchmark evaluates our checkpoints and agrees with our
own evaluation (RetrievalEvalCallback, zero-shot classification) on the same generated data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from align_lightning.cli import main, run
from align_lightning.clip_benchmark_plugin import MODEL_TYPE, load_align_lightning, register
from align_lightning.data import ZeroShotDataModule
from align_lightning.eval import topk_accuracy, zeroshot_classifier
from align_lightning.module import ALIGNModule
from tests.inference_utils import COLOURS, noise_image, tiny_checkpoint, write_retrieval_set

clip_benchmark = pytest.importorskip("clip_benchmark")

IMAGE_SIZE = 32  # the tiny checkpoint's training resolution


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


def test_register_adds_the_model_type_and_the_triple_follows_clip_benchmarks_conventions(checkpoint: Path) -> None:
    from clip_benchmark import models

    register()
    register()  # idempotent
    assert models.MODEL_TYPES.count(MODEL_TYPE) == 1
    model, transform, tokenizer = models.load_clip(MODEL_TYPE, "tiny", str(checkpoint), cache_dir=None, device="cpu")
    module = ALIGNModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    texts = ["a red circle", "a much longer caption about a green triangle on a dark background"]
    ids = tokenizer(texts)  # CLIP_benchmark: a list of texts -> one tensor
    assert isinstance(ids, torch.Tensor)
    reference = module.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        expected_text = module.model.encode_text(reference["input_ids"], reference["attention_mask"])
        expected_image = module.model.encode_image(transform(noise_image(0)).unsqueeze(0))
        torch.testing.assert_close(model.encode_text(ids), expected_text, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_image(transform(noise_image(0)).unsqueeze(0)), expected_image)
    assert transform(noise_image(0)).shape == (3, IMAGE_SIZE, IMAGE_SIZE)  # the checkpoint's evaluation size
    with pytest.raises(ValueError, match="--pretrained"):
        load_align_lightning("tiny", "", device="cpu")


def test_clip_benchmark_retrieval_equals_our_callback(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    karpathy, flickr = write_retrieval_set(tmp_path / "set", num_images=12, captions_per_image=3)
    out = tmp_path / "clip_benchmark.json"
    main(
        ["clip_benchmark", "eval", "--model_type", MODEL_TYPE, "--pretrained", str(checkpoint), "--model", "tiny"]
        + ["--dataset", "flickr30k", "--dataset_root", str(tmp_path / "set"), "--annotation_file", str(flickr)]
        + ["--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10", "--no_amp", "--num_workers", "0"]
        + ["--batch_size", "12", "--output", str(out)]
    )
    theirs = json.loads(out.read_text())["metrics"]
    # The same batches on both sides (all 12 images, then all 36 captions), so that the embeddings are the same
    # floats: the tiny model's near-tied scores would otherwise reorder on rounding differences.
    cli = run(
        ["validate", "--config", "recipes/eval_flickr30k.yaml", f"--ckpt_path={checkpoint}"]
        + [f"--data.init_args.annotations={karpathy}", f"--data.init_args.image_root={tmp_path / 'set'}"]
        + [f"--data.init_args.image_size={IMAGE_SIZE}", "--data.init_args.batch_size=36"]
        + ["--data.init_args.num_workers=0", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
        + ["--trainer.callbacks.init_args.examples=0", "--trainer.enable_progress_bar=false"]
    )
    ours = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    for k in (1, 5, 10):
        # CLIP_benchmark's "text retrieval" is image -> text (an image queries the captions).
        assert theirs[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"val/flickr30k/i2t_R@{k}"], abs=1e-6)
        assert theirs[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"val/flickr30k/t2i_R@{k}"], abs=1e-6)
    assert 0.0 < theirs["image_retrieval_recall@10"] < 1.0  # neither trivial nor saturated: the check has teeth


def test_clip_benchmark_zeroshot_classification_equals_ours(checkpoint: Path, tmp_path: Path) -> None:
    """CLIP_benchmark's classifier and logits on our triple equal our zeroshot_classifier's, and so do the accuracies.

    (Its ``evaluate`` stops in its ``accuracy``, which calls ``float()`` on a 1-element NumPy array, an error with
    the NumPy 2 installed here; the steps before it are the ones that involve the model.)
    """
    from clip_benchmark.metrics import zeroshot_classification

    for c, colour in enumerate(COLOURS):
        (tmp_path / "val" / colour).mkdir(parents=True)
        for i in range(3):
            noise_image(10 * c + i).save(tmp_path / "val" / colour / f"{i}.jpg", quality=95)
    classnames = sorted(COLOURS)  # ImageFolder's class order: sorted folder names
    templates = ["a photo of a {} shape.", "a {} thing."]
    model, transform, tokenizer = load_align_lightning("tiny", str(checkpoint), device="cpu")
    loader = DataLoader(ImageFolder(str(tmp_path / "val"), transform=transform), batch_size=5)
    their_classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, classnames, [t.replace("{}", "{c}") for t in templates], "cpu", amp=False
    )
    their_logits, their_targets = zeroshot_classification.run_classification(
        model, their_classifier, loader, "cpu", amp=False
    )

    module = ALIGNModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    data = ZeroShotDataModule(
        tmp_path / "val", classnames=classnames, templates=templates, image_size=IMAGE_SIZE, num_workers=0
    )
    data.setup()
    with torch.no_grad():
        weights = zeroshot_classifier(module.model, data.classnames, data.templates, module.tokenizer)
        images = torch.cat([module.model.encode_image(batch["pixel_values"]) for batch in data.image_dataloader()])
    torch.testing.assert_close(their_classifier, weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(their_logits, 100.0 * images @ weights, atol=1e-3, rtol=1e-5)  # CLIP's fixed scale 100
    assert torch.equal(their_targets, data.targets)
    assert topk_accuracy(their_logits, their_targets) == topk_accuracy(images @ weights, data.targets)
