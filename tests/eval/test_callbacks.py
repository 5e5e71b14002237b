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


# ------------------------------------------------------------------ the trainer's data is the evaluation set


def _eval_sets(corpus, tokenizer=None) -> tuple[RetrievalDataModule, ZeroShotDataModule]:  # noqa: ANN001
    retrieval = RetrievalDataModule(
        corpus.karpathy_json, corpus.image_root, split="val", name="demo_ret", image_size=32, batch_size=4,
        num_workers=0, tokenizer=tokenizer,
    )  # fmt: skip
    zeroshot = ZeroShotDataModule(
        corpus.zeroshot_root, classnames=str(corpus.classnames_file), templates=list(corpus.templates),
        name="demo_zs", image_size=32, batch_size=8, num_workers=0,
    )  # fmt: skip
    return retrieval, zeroshot


def test_trainer_loop_on_an_evaluation_set_equals_the_callbacks_own_loop(corpus, train_data, tmp_path: Path) -> None:  # noqa: ANN001
    """`trainer.validate(model, datamodule=RetrievalDataModule)` + a callback without datamodule: same values."""
    module = _module(len(train_data.tokenizer))
    own = _validate(module, train_data, corpus, tmp_path / "own")
    module.tokenizer = train_data.tokenizer  # as restored from a checkpoint; the evaluation sets have none
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    for datamodule, callback, prefix in (
        (_eval_sets(corpus)[0], RetrievalEvalCallback(progress=False), "val/demo_ret/"),
        (_eval_sets(corpus)[1], ZeroShotEvalCallback(progress=False), "val/demo_zs/"),
    ):
        trainer = L.Trainer(callbacks=[callback], default_root_dir=tmp_path, **options)
        driven = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule)[0].items()}
        assert driven
        assert set(driven) == {k for k in own if k.startswith(prefix)}
        for key, value in driven.items():
            assert value == pytest.approx(own[key], abs=1e-6), key
        tested = L.Trainer(callbacks=[callback], default_root_dir=tmp_path, **options)
        assert {k.replace("test/", "val/", 1) for k in tested.test(module, datamodule=datamodule)[0]} == set(driven)


def test_trainer_loop_ddp_two_ranks_equals_one_process(corpus, train_data, tmp_path: Path) -> None:  # noqa: ANN001
    """The trainer's own loop over an odd-sized evaluation set on 2 CPU ranks: nothing dropped or repeated."""
    results = []
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        module = _module(len(train_data.tokenizer))
        module.tokenizer = train_data.tokenizer
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_progress_bar=False,
            callbacks=[RetrievalEvalCallback(progress=False)], default_root_dir=tmp_path,
        )  # fmt: skip
        results.append({k: float(v) for k, v in trainer.validate(module, datamodule=_eval_sets(corpus)[0])[0].items()})
    assert results[0]
    assert results[0] == pytest.approx(results[1], abs=1e-6)


def test_an_evaluation_set_without_its_callback_is_an_error(corpus, train_data, tmp_path: Path) -> None:  # noqa: ANN001
    module = _module(len(train_data.tokenizer))
    module.tokenizer = train_data.tokenizer
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="add align_lightning.eval.ZeroShotEvalCallback"):
        trainer.validate(module, datamodule=_eval_sets(corpus)[1])
    # A callback evaluating another set does not count.
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
        callbacks=[ZeroShotEvalCallback(_eval_sets(corpus)[1], progress=False)],
    )  # fmt: skip
    with pytest.raises(ValueError, match="add align_lightning.eval.RetrievalEvalCallback"):
        trainer.validate(module, datamodule=_eval_sets(corpus)[0])


def test_limited_evaluation_loop_is_refused(corpus, train_data, tmp_path: Path) -> None:  # noqa: ANN001
    module = _module(len(train_data.tokenizer))
    module.tokenizer = train_data.tokenizer
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path, limit_val_batches=2,
        callbacks=[RetrievalEvalCallback(progress=False)],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="limit_val_batches"):
        trainer.validate(module, datamodule=_eval_sets(corpus)[0])


def test_pictures_go_to_the_run_folder_and_tensorboard(corpus, train_data, tmp_path: Path) -> None:  # noqa: ANN001
    from lightning.pytorch.loggers import TensorBoardLogger
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = _module(len(train_data.tokenizer))
    retrieval, zeroshot = _eval_sets(corpus, tokenizer=train_data.tokenizer)
    callbacks = [
        RetrievalEvalCallback(retrieval, examples=3, progress=False),
        ZeroShotEvalCallback(zeroshot, confusion_matrix=True, progress=False),
    ]
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(
        accelerator="cpu", logger=logger, enable_progress_bar=False, callbacks=callbacks, default_root_dir=tmp_path
    )
    trainer.validate(module, datamodule=train_data)
    figures = sorted(p.name for p in (Path(logger.log_dir) / "figures").iterdir())
    assert figures == [
        "val_demo_ret_retrieval_examples_step0000000.png",
        "val_demo_zs_confusion_matrix_step0000000.png",
    ]
    examples = Image.open(Path(logger.log_dir) / "figures" / figures[0])
    assert examples.height > 3 * 112  # three query rows of thumbnails
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"val/demo_ret/retrieval_examples", "val/demo_zs/confusion_matrix"}


def test_evaluating_during_training_does_not_change_training(corpus, train_data, tmp_path: Path) -> None:  # noqa: ANN001
    """Same seed, with and without an evaluation every 2 steps: identical weights (the RNG is left alone)."""
    weights = []
    for callbacks in ([], [_callbacks(corpus)[0]]):
        for callback in callbacks:
            callback.every_n_steps = 2
        L.seed_everything(3)
        module = _module(len(train_data.tokenizer))
        trainer = L.Trainer(
            accelerator="cpu", max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, callbacks=callbacks, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(module, datamodule=train_data)
        weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert torch.equal(weights[0], weights[1])
