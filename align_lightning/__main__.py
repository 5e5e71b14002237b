"""``python -m align_lightning``: the LightningCLI entry point."""

from align_lightning.cli import main

if __name__ == "__main__":
    main()
