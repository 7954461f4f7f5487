"""nni_pipebd: Pipe-BD blockwise-distillation NAS for NNI — teacher relaying, decoupled updates, hybrid distribution."""

from .config import Config, ConfigError, load_config
from .imports import lazy_names
from .known_warnings import hide_if_asked

# A worker the CLI spawned imports this package first: hide the known third-party warnings before anything imports
# NNI (its import is what warns), as the CLI did in the lead process (NNI_PIPEBD_WARNINGS=hide, inherited).
hide_if_asked()

# Everything else loads on first use: importing the package (e.g. NNI's tuner process, which must connect to
# the NNI manager within 10 s) must not pull in torch.
_LAZY = {
    "train": "executors.launch", "WorkerError": "executors.launch", "Job": "job", "build_job": "job",
    "BlockSpec": "spec.blocks", "ShapeMismatchError": "spec.blocks", "DnaBlock": "spaces.dna",
    "BlockSupernet": "spaces.supernet",
    "StudentSpace": "spaces.dna", "Executor": "executors.base", "register": "executors.base",
    "get_executor": "executors.base", "executor_names": "executors.base",
}

__all__ = ["Config", "ConfigError", "load_config", *_LAZY]
__version__ = "0.1.0"


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
