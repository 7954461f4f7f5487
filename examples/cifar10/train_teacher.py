"""Train the CIFAR-10 teacher of a recipe config and save it where the config's ``model.teacher.checkpoint`` says.

    python examples/cifar10/train_teacher.py examples/cifar10/config.yaml [--epochs N] [--log-dir runs/teacher]

Lightning's logs go to ``--log-dir`` (default ``runs/teacher``, ignored by git), not beside the checkpoint.
"""

import argparse
import logging
import sys
from pathlib import Path

from nni_pipebd.config import load_config
from nni_pipebd.spec.pretrain import train_teacher


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--epochs", type=int, help="overrides model.teacher.train_epochs")
    parser.add_argument("--log-dir", default="runs/teacher", help="where Lightning's logs go (default: runs/teacher)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    if args.epochs is not None:
        config = config.replace(model={"teacher": {**config.to_dict()["model"]["teacher"], "train_epochs": args.epochs}})
    path = config.resolve_path(config.model.teacher.checkpoint)
    metrics = train_teacher(config, path, Path(args.log_dir))
    print(f"teacher saved to {path}: val accuracy {metrics['val_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
