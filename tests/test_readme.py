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
