"""nni_pipebd: Pipe-BD blockwise-distillation NAS for NNI — teacher relaying, decoupled updates, hybrid distribution."""

from .config import Config, ConfigError, load_config
from .executors.base import Executor, executor_names, get_executor, register
from .executors.launch import WorkerError, train
from .job import Job, build_job
from .spaces.dna import DnaBlock, StudentSpace
from .spec.blocks import BlockSpec, ShapeMismatchError

__all__ = [
    "Config", "ConfigError", "load_config", "train", "WorkerError", "Job", "build_job", "BlockSpec",
    "ShapeMismatchError", "DnaBlock", "StudentSpace", "Executor", "register", "get_executor", "executor_names",
]
__version__ = "0.1.0"
