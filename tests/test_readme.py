"""The README's Python example runs as written (with the Trainer shortened to two steps)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
TRAINER = "L.Trainer(max_epochs=1)"


def test_readme_python_example_runs() -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert TRAINER in code, "update this test together with the README example"
    short = "L.Trainer(max_steps=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False)"
    namespace: dict = {}
    exec(compile(code.replace(TRAINER, short), str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["loss"].ndim == 0
    assert namespace["image_embeds"].shape == namespace["text_embeds"].shape


def test_readme_evaluation_example_runs(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The Evaluation section's Python example, its paths pointed at a generated corpus in the same formats."""
    import lightning as L

    from align_lightning import ALIGNModule, DualEncoder, ImageTower, TextTower
    from align_lightning.data import train_wordpiece
    from align_lightning.data.demo_corpus import write_demo_corpus
    from tests.conftest import TINY_BERT

    text = README.read_text()
    code = re.search(r"\*\*The pieces\.\*\*.*?```python\n(.*?)```", text, re.S).group(1)
    corpus = write_demo_corpus(tmp_path / "corpus", num_train=8, num_eval=6)
    for old, new in (
        ("data/dataset_flickr30k.json", corpus.karpathy_json),
        ("data/flickr30k-images", corpus.image_root),
        ("data/dataset_coco.json", corpus.karpathy_json),
        ('"data/coco"', f'"{corpus.image_root}"'),
        ("data/imagenet/val", corpus.zeroshot_root),
        ("data/imagenet/classnames.txt", corpus.classnames_file),
    ):
        assert str(old) in code, old
        code = code.replace(str(old), str(new))
    tokenizer = train_wordpiece(["a red circle", "a small blue square on a dark background"], vocab_size=80)
    model = DualEncoder(ImageTower("test_efficientnet"), TextTower(config=TINY_BERT, vocab_size=len(tokenizer)))
    module = ALIGNModule(model)
    module.tokenizer = tokenizer  # as restored from a checkpoint
    monkeypatch.chdir(tmp_path)
    namespace = {"L": L, "module": module}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    metrics = namespace["trainer"].callback_metrics
    assert {"val/flickr30k/i2t_R@1", "val/flickr30k/t2i_R@10"} <= set(metrics)
