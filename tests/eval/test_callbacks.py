"""Evaluation callbacks: contract keys, values equal to a direct computation, DDP equal to one process."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from align_lightning import ALIGNModule, ContrastiveLoss, DualEncoder, ImageTower, TextTower
from align_lightning.data import DemoDataModule, RetrievalDataModule, ZeroShotDataModule
from align_lightning.data.demo_corpus import write_demo_corpus
from align_lightning.eval import retrieval_metrics, topk_accuracy, zeroshot_classifier
from align_lightning.eval.callbacks import RetrievalEvalCallback, ZeroShotEvalCallback
from tests.conftest import TINY_BERT

NUM_EVAL = 21  # odd: two ranks get 10 and 11 images


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), num_train=40, num_eval=NUM_EVAL)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> DemoDataModule:
    root = tmp_path_factory.mktemp("demo")
    return DemoDataModule(num_train=64, num_val=16, image_size=32, batch_size=8, root=str(root))


def _module(vocab_size: int) -> ALIGNModule:
    torch.manual_seed(0)
    model = DualEncoder(ImageTower("test_efficientnet"), TextTower(config=TINY_BERT, vocab_size=vocab_size))
    return ALIGNModule(model, ContrastiveLoss())


def _callbacks(corpus) -> list[L.Callback]:  # noqa: ANN001
    retrieval = RetrievalDataModule(
        corpus.karpathy_json,
        corpus.image_root,
        split="val",
        name="demo_ret",
        image_size=32,
        batch_size=4,
        num_workers=0,
    )
    zeroshot = ZeroShotDataModule(
        corpus.zeroshot_root,
        classnames=str(corpus.classnames_file),
        templates=list(corpus.templates),
        name="demo_zs",
        image_size=32,
        batch_size=8,
        num_workers=0,
    )
    return [RetrievalEvalCallback(retrieval, progress=False), ZeroShotEvalCallback(zeroshot, progress=False)]


def _validate(module: ALIGNModule, data: DemoDataModule, corpus, tmp_path: Path, **trainer) -> dict[str, float]:  # noqa: ANN001, ANN003
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    run = L.Trainer(callbacks=_callbacks(corpus), default_root_dir=tmp_path, **{**options, **trainer})
    return {k: float(v) for k, v in run.validate(module, datamodule=data)[0].items()}


def test_callbacks_log_the_contract_keys_with_the_direct_values(corpus, train_data, tmp_path: Path) -> None:  # noqa: ANN001
    module = _module(len(train_data.tokenizer))
    metrics = _validate(module, train_data, corpus, tmp_path)
    for k in (1, 5, 10):
        assert f"val/demo_ret/i2t_R@{k}" in metrics
        assert f"val/demo_ret/t2i_R@{k}" in metrics
    assert {"val/demo_ret/i2t_median_rank", "val/demo_ret/t2i_median_rank"} <= set(metrics)
    assert {"val/demo_zs/top1", "val/demo_zs/top5"} <= set(metrics)

    # The same numbers computed directly, on the whole sets at once.
    model = module.model.eval()
    retrieval = RetrievalDataModule(
        corpus.karpathy_json, corpus.image_root, split="val", image_size=32, tokenizer=train_data.tokenizer
    )
    with torch.no_grad():
        images = torch.cat([model.encode_image(b["pixel_values"]) for b in retrieval.image_dataloader()])
        texts = torch.cat([model.encode_text(b["input_ids"], b["attention_mask"]) for b in retrieval.text_dataloader()])
        expected = retrieval_metrics(images, texts, retrieval.text_to_image)
        zeroshot = ZeroShotDataModule(
            corpus.zeroshot_root,
            classnames=str(corpus.classnames_file),
            templates=list(corpus.templates),
            image_size=32,
        )
        classifier = zeroshot_classifier(model, zeroshot.classnames, zeroshot.templates, train_data.tokenizer)
        scores = torch.cat([model.encode_image(b["pixel_values"]) @ classifier for b in zeroshot.image_dataloader()])
        expected_zs = topk_accuracy(scores, zeroshot.targets, ks=(1, 5))
    for key, value in expected.items():
        if key.startswith(("i2t_R@", "t2i_R@")):
            assert metrics[f"val/demo_ret/{key}"] == pytest.approx(value), key
    assert metrics["val/demo_zs/top1"] == pytest.approx(expected_zs["top1"])
    assert metrics["val/demo_zs/top5"] == pytest.approx(expected_zs["top5"])


def test_ddp_two_ranks_equal_one_process(corpus, train_data, tmp_path: Path) -> None:  # noqa: ANN001
    """2 CPU ranks, an odd number of images: nothing dropped or duplicated, same metrics."""
    module = _module(len(train_data.tokenizer))
    single = _validate(module, train_data, corpus, tmp_path / "one")
    module = _module(len(train_data.tokenizer))
    ddp = _validate(module, train_data, corpus, tmp_path / "ddp", devices=2, strategy="ddp_spawn")
    for key, value in single.items():
        if key.startswith(("val/demo_ret/", "val/demo_zs/")):
            assert ddp[key] == pytest.approx(value, abs=1e-6), key


def test_every_n_steps_evaluates_during_training(corpus, train_data, tmp_path: Path) -> None:  # noqa: ANN001
    retrieval, zeroshot = _callbacks(corpus)
    retrieval.every_n_steps = 2
    calls: list[int] = []
    original = retrieval.run

    def counted(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        calls.append(trainer.global_step)
        return original(trainer, pl_module, stage)

    retrieval.run = counted  # type: ignore[method-assign]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        limit_val_batches=0,  # no validation loop: only the step schedule evaluates
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[retrieval],
        default_root_dir=tmp_path,
    )
    trainer.fit(_module(len(train_data.tokenizer)), datamodule=train_data)
    assert calls == [2, 4]
    assert "val/demo_ret/i2t_R@1" in trainer.callback_metrics
    with pytest.raises(ValueError, match="every_n_steps"):
        RetrievalEvalCallback(retrieval.datamodule, every_n_steps=0)


def _gather_on_two_ranks(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from align_lightning.eval.callbacks import gather_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # 3 rows over 2 ranks, interleaved indices; then 1 row: rank 1 has none.
        index = torch.tensor([0, 2]) if rank == 0 else torch.tensor([1])
        rows = torch.stack([torch.full((4,), float(i)) for i in index.tolist()])
        first = gather_rows(rows, index)
        one = gather_rows(
            torch.ones(1, 4) if rank == 0 else torch.empty(0), torch.tensor([0] if rank == 0 else []).long()
        )
        torch.save({"first": first, "one": one}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_rows_orders_by_index_and_handles_an_empty_rank(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_on_two_ranks, args=(port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["first"], torch.arange(3.0).unsqueeze(1).expand(3, 4))
        torch.testing.assert_close(result["one"], torch.ones(1, 4))
