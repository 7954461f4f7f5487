"""The job description: YAML file <-> validated dataclasses."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .data.names import DATASET_NAMES, torchvision_names

__all__ = [
    "ConfigError", "TeacherConfig", "StudentConfig", "ModelConfig", "DataConfig",
    "DistillConfig", "ExecutionConfig", "Config", "load_config",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass
class TeacherConfig:
    """The pretrained teacher and how it is split into blocks.

    The teacher is one of: ``arch`` (a torchvision classification model or ``digits_cnn``), ``class_path`` (your
    own callable returning an ``nn.Module``) or ``module`` (a whole model saved with ``torch.save(model, path)``);
    with none of them, ``mobilenet_v2``.

    Parameters
    ----------
    arch : str, optional
        Any name of ``torchvision.models.list_models()`` (e.g. ``resnet50``, ``regnet_y_400mf``,
        ``efficientnet_b7``) or ``digits_cnn``.
    num_classes : int
        Classes of the classifier head of an ``arch``.
    kwargs : dict
        Extra keyword arguments of the ``arch`` constructor (e.g. ``width_mult``).
    class_path : str, optional
        ``package.module:function`` or ``package.module.Class`` returning the teacher (a module beside the config
        file is found too); spawned workers and torchrun ranks rebuild it by import.
    init_args : dict
        Keyword arguments of ``class_path``.
    module : str, optional
        A file written by ``torch.save(model, path)``: the teacher itself, weights included (its class must be
        importable). ``train(config, out, teacher=model)`` writes one.
    checkpoint : str, optional
        Path of a local ``state_dict`` for ``arch`` / ``class_path`` (relative paths are relative to the config file).
    weights : str, optional
        Name of torchvision weights (e.g. ``IMAGENET1K_V1``) present in the local torch hub cache.
    train_if_missing : bool
        When ``checkpoint`` does not exist, train the teacher on the configured data and cache it there.
    train_epochs : int
        Epochs of that teacher training (under PyTorch Lightning, on ``execution.device``).
    train_precision : str
        Lightning precision of that training: ``32-true``, ``16-mixed``, ``bf16-mixed``, ``16-true``, ``bf16-true``
        or ``64-true``.
    train_devices : int
        Devices of that training, in data parallel.
    train_strategy : str
        Lightning strategy of that training (``auto``: one device, or ``ddp_spawn`` with several; also ``ddp``,
        ``ddp_spawn``, ``ddp_fork``, ``fsdp``, ``deepspeed`` ...).
    pretrained : bool
        The teacher must come with weights (``checkpoint``, ``weights`` or ``module``); a config without them is an
        error. ``false`` distils a randomly initialised teacher on purpose (benchmarks, tests); the library
        records it and ``search`` / ``report`` warn.
    boundaries : list of str or int, optional
        Where blocks 1..N-1 start: module names as in ``named_modules()`` (e.g. ``[layer2, layer3, layer4, avgpool]``),
        names of functional ops as listed by ``nni-pipebd blocks``, or indices of the model's direct children.
        Default: at every unit that lowers the resolution, with the classifier head as the last block.
    leaf_modules : list of str
        Module classes the split's tracing (torch.fx) must not enter, for models with untraceable parts: import paths
        (``package.module.Class``) or names of classes in the model. A block boundary cannot fall inside one. The
        model library's own declarations (timm's FX registries) apply without listing them.
    autowrap_functions : list of str
        Functions tracing records as one call instead of entering them (e.g. shape arithmetic with ``max``): import
        paths (``package.module:function``) or names of module-level functions of the model's modules.
    """

    arch: Optional[str] = None
    num_classes: int = 10
    kwargs: dict = field(default_factory=dict)
    class_path: Optional[str] = None
    init_args: dict = field(default_factory=dict)
    module: Optional[str] = None
    checkpoint: Optional[str] = None
    weights: Optional[str] = None
    train_if_missing: bool = False
    train_epochs: int = 10
    train_precision: str = "32-true"
    train_devices: int = 1
    train_strategy: str = "auto"
    pretrained: bool = True
    boundaries: Optional[list] = None
    leaf_modules: list = field(default_factory=list)
    autowrap_functions: list = field(default_factory=list)


@dataclass
class StudentConfig:
    """The student: one block space per teacher block, from a block-space factory.

    The factory is ``class_path`` (yours) or a built-in ``kind``: the DNA MBConv space (``dna``), one fixed path of
    it (``fixed``), DONNA's MobileNet-type space (``donna``: kernel, expansion, depth, attention and inner width
    per block) or a vision-transformer space (``vit``: depth, embedding width, heads and MLP ratio per block, after
    AutoFormer and DONNA). It is called once per teacher block as ``factory(index=i, shape_in=(C, H, W), shape_out=...,
    teacher_block=module, **init_args)`` and returns an NNI ``ModelSpace`` (``LayerChoice``, ``Repeat``,
    ``nni.choice`` in ``MutableConv2d`` ...; trained as a weight-sharing supernet), a plain ``nn.Module`` (a fixed
    block) or ``None`` (a freshly initialised copy of the teacher block, e.g. for the classifier head).

    Parameters
    ----------
    kind : str
        ``dna`` (supernet blocks with NNI ``LayerChoice``), ``fixed`` (one path, for compression), ``donna``
        (DONNA's space; its job files default to ``distill.loss: nmse``) or ``vit`` (transformer layers, for a
        teacher whose blocks output token sequences); ignored with ``class_path``.
    kernels : list of int
        Candidate depthwise kernel sizes (built-in kinds).
    expansions : list of int, optional
        Candidate expansion ratios (built-in kinds); default ``[3, 6]`` (``dna``, ``fixed``) or ``[2, 3, 4, 6]``
        (``donna``).
    identity : bool
        Add an identity candidate where stride is 1 and widths match (``dna``, ``fixed``).
    width_mult : float
        Student width relative to the teacher block's output width (inner layers only; ``dna``, ``fixed``).
    widths : list of float, optional
        ``donna``: candidate inner widths relative to the teacher block's output width; ``vit``: candidate
        embedding widths relative to the teacher's token width (rounded to a multiple of every head count); default
        ``[0.5, 0.75, 1.0]``.
    heads : list of int, optional
        ``vit``: candidate attention head counts; default ``[2, 4]``.
    mlp_ratios : list of int, optional
        ``vit``: candidate MLP expansion ratios; default ``[2, 4]``.
    attention : list of str, optional
        ``donna``: candidate attention modules, of ``none`` and ``se`` (squeeze-and-excitation); default both.
    layers : list of int, optional
        Layers per block (``donna``, ``vit``: the most layers, the depth choice is 1..layers); default: derived
        from the teacher's blocks (spatial convolutions; ``vit``: encoder layers).
    path : dict or str, optional
        For ``fixed``: an NNI sample dict, or one candidate name (e.g. ``k3e3``) used everywhere.
    class_path : str, optional
        ``package.module:function`` (or ``package.module.Class``) of your block-space factory (a module beside the
        config file is found too); labels must be unique across blocks (put the block index in them).
    init_args : dict
        Extra keyword arguments of ``class_path``.
    module : str, optional
        Instead of a factory: a file written by ``torch.save(space, path)`` of an NNI ``ModelSpace`` whose ``blocks``
        (an ``nn.ModuleList`` / ``nn.Sequential``) are the block spaces, one per teacher block (or one fewer: the
        classifier head is then a fresh copy of the teacher's). ``train(config, out, student=space)``,
        ``BlockwiseDistillation(..., student=space)`` and the strategies (for the space given to ``NasExperiment``)
        write one.
    """

    kind: str = "dna"
    kernels: list = field(default_factory=lambda: [3, 5, 7])
    expansions: Optional[list] = None
    identity: bool = False
    width_mult: float = 1.0
    widths: Optional[list] = None
    attention: Optional[list] = None
    heads: Optional[list] = None
    mlp_ratios: Optional[list] = None
    layers: Optional[list] = None
    path: Optional[Union[dict, str]] = None
    class_path: Optional[str] = None
    init_args: dict = field(default_factory=dict)
    module: Optional[str] = None

    def candidate_expansions(self) -> list:
        """``expansions``, or the default of ``kind``."""
        if self.expansions is not None:
            return list(self.expansions)
        return list(DONNA_EXPANSIONS if self.kind == "donna" else DNA_EXPANSIONS)

    def candidate_widths(self) -> list:
        """``widths``, or the ``donna`` default."""
        return list(DONNA_WIDTHS if self.widths is None else self.widths)

    def candidate_attention(self) -> list:
        """``attention``, or the ``donna`` default."""
        return list(DONNA_ATTENTION if self.attention is None else self.attention)


DNA_EXPANSIONS = (3, 6)
DONNA_EXPANSIONS = (2, 3, 4, 6)
DONNA_WIDTHS = (0.5, 0.75, 1.0)
DONNA_ATTENTION = ("none", "se")
DONNA_LOSS = "nmse"
"""``distill.loss`` of a job file with ``model.student.kind: donna`` that names no loss."""


@dataclass
class ModelConfig:
    """Teacher and student."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)


@dataclass
class DataConfig:
    """The data set, its preprocessing and the batch size.

    Parameters
    ----------
    name : str, optional
        ``digits`` (scikit-learn, ships; the default), ``synthetic``, ``cifar10`` (local folder), ``imagefolder``, or
        a torchvision data set with a ``train`` flag or a ``split`` (e.g. ``MNIST``, ``FashionMNIST``, ``CIFAR100``,
        ``SVHN``) read from ``root`` — never downloaded.
    class_path : str, optional
        Instead of ``name``: ``package.module:function`` returning ``(train_dataset, val_dataset)`` of
        ``(image tensor [C, H, W], int label)`` items (a module beside the config file is found too).
    init_args : dict
        Keyword arguments of ``class_path``.
    root : str, optional
        Folder of ``cifar10`` / ``imagefolder`` / torchvision data (relative to the config file).
    image_size : int
        Side of the (square) input images (built-in and torchvision data sets).
    channels : int
        Input channels (grey images are replicated to this many channels).
    batch_size : int
        Global batch size of one step (split across a data-parallel group).
    num_samples : int
        Size of the ``synthetic`` data set.
    num_workers : int
        Loader worker processes.
    """

    name: Optional[str] = None
    class_path: Optional[str] = None
    init_args: dict = field(default_factory=dict)
    root: Optional[str] = None
    image_size: int = 32
    channels: int = 3
    batch_size: int = 32
    num_samples: int = 256
    num_workers: int = 0


@dataclass
class DistillConfig:
    """Blockwise distillation hyper-parameters (the same for every block).

    Parameters
    ----------
    loss : str
        ``mse`` or ``nmse`` (MSE divided by the teacher output's mean square, DNA-style normalisation).
    optimizer : str
        ``sgd`` or ``adam``.
    lr, momentum, weight_decay : float
        Optimizer settings.
    schedule : str
        ``cosine`` (over all steps of the block) or ``constant``.
    epochs : int
        Epochs per block.
    max_steps_per_epoch : int, optional
        Cut every epoch after this many steps (quick runs, tests).
    paths_per_step : int
        Supernet paths sampled per step (1 = SPOS/DNA); gradients of the paths are averaged.
    on_nonfinite : str
        A NaN/Inf block loss ``stop``\ s the run (naming block and step) or ``skip``\ s that batch's update.
    seed : int
        Seeds student initialisation, path sampling and data order.
    until : str
        ``epochs``: every block trains ``epochs`` epochs. ``plateau``: each block stops on its own once its epoch
        loss has not improved on its best by more than ``min_improvement`` (relative) for ``patience`` epochs in
        a row, ``epochs`` being the cap; the library records why and when every block stopped.
    patience : int
        Epochs without improvement before a block stops (``until: plateau``).
    min_improvement : float
        Relative loss decrease that counts as an improvement (``until: plateau``; 0.01 = 1%).
    """

    loss: str = "mse"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    epochs: int = 1
    max_steps_per_epoch: Optional[int] = None
    paths_per_step: int = 1
    on_nonfinite: str = "stop"
    seed: int = 0
    until: str = "epochs"
    patience: int = 3
    min_improvement: float = 0.01


@dataclass
class ExecutionConfig:
    """How the work is laid out on processes and devices.

    Parameters
    ----------
    executor : str
        A registered executor name (``reference``, ``dp``, ...).
    workers : int
        Worker processes (one per device).
    backend : str
        ``auto`` (NCCL with CUDA, else gloo), ``gloo`` or ``nccl``.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    sync_bn : bool
        Synchronise BatchNorm statistics inside a data-parallel group (same math as one process). A path split
        needs none: each of its devices has the whole batch.
    grad_sync : str
        How a student block whose batch is split over a group sums its gradients: ``flat`` (one all-reduce of
        every gradient after backward) or ``ddp`` (``DistributedDataParallel``: bucketed all-reduces overlapped
        with backward). Both give the same gradients up to float rounding. A block whose sampled paths are split
        over its devices (``split: paths`` in a plan) always uses one flat all-reduce, whatever this says.
    timeout_s : float
        Timeout of every collective and receive.
    threads_per_worker : int, optional
        ``torch.set_num_threads`` in each worker (the in-process reference too); default: the machine's cores
        divided by the workers on it. CPU kernels sum in an order that depends on the thread count, so runs with
        different numbers of workers agree bit for bit only when this is fixed (e.g. 1).
    boundaries : list of int, optional
        ``pipebd``: the first block of every stage (one per worker, starting at 0); default: balanced by
        estimated cost.
    decoupled : bool
        ``pipebd``: each stage steps its optimizers as soon as its backward ends (DPU); off, all stages wait at
        a barrier before every step (teacher relaying only, for the ablation).
    queue_depth : int
        ``pipebd``: activations in flight between two stages (bounds how far stages drift apart).
    plan : str, optional
        ``pipebd``: ``auto`` (profile, then solve for stages and devices per stage) or the path of a plan JSON
        file (``nni-pipebd plan``); replaces ``boundaries``.
    memory_limit_mb : float, optional
        ``pipebd`` with ``plan: auto``: per-device memory limit the solver must respect.
    placement : str
        ``pipebd`` with ``plan: auto``: ``free`` (default) places every student block on any devices, fed with
        its teacher block's input and target (:func:`nni_pipebd.plan.placement.place`); ``stages`` keeps
        Pipe-BD's stages, each student on its teacher block's devices (AHD, :func:`nni_pipebd.plan.solver.solve`).
    block_costs : list of [float, float], optional
        Per block, the cost of its teacher forward and of its student step (e.g. measured seconds), used to
        balance ``pipebd`` stages and ``ls`` assignments; default: estimated from multiply-accumulates.
    checkpoint_every : int, optional
        Write a resumable checkpoint of every stage after this many steps (``train --resume`` continues).
    precision : str
        ``fp32``; ``bf16`` (teacher forwards and student forward + loss under bfloat16 autocast, weights and
        optimizer in fp32; relayed activations travel in the dtype the teacher produced them, half the bytes);
        ``fp16`` (the same with float16 and a loss scaler per block; CUDA only); ``fp64`` (teacher, students, data
        batches, relayed activations, all-reduces, checkpoints and the saved blocks in float64, no autocast, on CPU
        and CUDA alike: for exact comparisons and debugging numerics — a batch split over devices then matches one
        device to ~1e-13, where float32's rounding, amplified by training, moved weights by 1.7e-3; slow on most
        GPUs, twice the memory and bytes; the search loads the float64 blocks into its float32 networks).
    channels_last : bool
        Teacher and student blocks and the activations they take in ``torch.channels_last`` memory format
        (faster convolutions on tensor-core GPUs).
    deterministic : bool
        Deterministic kernels in every worker (``torch.use_deterministic_algorithms``, cuDNN deterministic, no
        autotuning; ``CUBLAS_WORKSPACE_CONFIG`` set if unset): on a GPU, what makes layouts bitwise equal run to
        run, at some speed. CPU kernels are deterministic already.
    """

    executor: str = "reference"
    workers: int = 1
    backend: str = "auto"
    device: str = "auto"
    sync_bn: bool = True
    grad_sync: str = "flat"
    timeout_s: float = 300.0
    threads_per_worker: Optional[int] = None
    boundaries: Optional[list] = None
    decoupled: bool = True
    queue_depth: int = 2
    plan: Optional[str] = None
    memory_limit_mb: Optional[float] = None
    placement: str = "free"
    block_costs: Optional[list] = None
    checkpoint_every: Optional[int] = None
    precision: str = "fp32"
    channels_last: bool = False
    deterministic: bool = False


@dataclass
class Config:
    """A whole job: model, data, distillation and execution.

    ``base_dir`` (not part of the YAML) is the folder relative paths are resolved against.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    base_dir: str = field(default=".", metadata={"yaml": False})

    @classmethod
    def from_dict(cls, raw: dict, base_dir: Union[str, Path] = ".") -> "Config":
        """Build a validated config from plain data (unknown keys and wrong types raise).

        ``distill.loss`` defaults to ``nmse`` (DONNA's normalised block loss) for ``model.student.kind: donna``.
        """
        config = _build(cls, raw, "")
        config.base_dir = str(base_dir)
        distill = raw.get("distill") if isinstance(raw, dict) else None
        if config.model.student.kind == "donna" and config.model.student.class_path is None and \
                not (isinstance(distill, dict) and distill.get("loss") is not None):
            config.distill.loss = DONNA_LOSS
        validate(config)
        return config

    def to_dict(self) -> dict:
        """Plain data for YAML/JSON (without ``base_dir``)."""
        raw = dataclasses.asdict(self)
        raw.pop("base_dir")
        return raw

    def resolve_path(self, path: Optional[str]) -> Optional[Path]:
        """Resolve a path of the config relative to ``base_dir``."""
        if path is None:
            return None
        path = Path(path).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    def with_teacher(self, module_file: Union[str, Path]) -> "Config":
        """A copy whose teacher is the whole model saved in ``module_file`` (see ``spec.teachers.save_teacher_module``)."""
        teacher = {**self.to_dict()["model"]["teacher"], "arch": None, "class_path": None, "init_args": {},
                   "kwargs": {}, "checkpoint": None, "weights": None, "train_if_missing": False, "pretrained": True,
                   "module": str(Path(module_file).resolve())}
        return self.replace(model={"teacher": teacher})

    def with_student(self, module_file: Union[str, Path]) -> "Config":
        """A copy whose student is the space saved in ``module_file`` (see ``library.save_object_file``)."""
        student = {**self.to_dict()["model"]["student"], "class_path": None, "init_args": {}, "kind": "dna",
                   "module": str(Path(module_file).resolve())}
        return self.replace(model={"student": student})

    def replace(self, **sections: dict) -> "Config":
        """A copy with some fields of some sections changed, e.g. ``execution={"workers": 2}``."""
        raw = self.to_dict()
        for section, values in sections.items():
            if section not in raw:
                raise ConfigError(f"unknown config section {section!r}; valid: {sorted(raw)}")
            raw[section].update(values)
        return Config.from_dict(raw, self.base_dir)


def load_config(path: Union[str, Path]) -> Config:
    """Read a YAML config file; relative paths inside resolve against its folder.

    Raises
    ------
    ConfigError
        The file is missing, is not valid YAML (the message gives file, line and column), is empty or does not
        hold a mapping at its top level, or a value is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        hint = "; indent with spaces, not tabs" if "\\t" in problem else ""
        raise ConfigError(f"{where}: invalid YAML: {problem}{hint}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason} at byte {err.start}); give a YAML job file") from None
    if raw is None:
        raise ConfigError(f"{path} is empty; a job needs at least the model, data and distill sections (see "
                          "examples/digits/config.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, distill, execution), "
                          f"got {type(raw).__name__} {str(raw)[:60]!r}")
    return Config.from_dict(raw, path.parent.resolve())


_CHOICES = {
    "model.student.kind": ("dna", "fixed", "donna", "vit"),
    "distill.loss": ("mse", "nmse"),
    "distill.optimizer": ("sgd", "adam"),
    "distill.schedule": ("cosine", "constant"),
    "distill.on_nonfinite": ("stop", "skip"),
    "distill.until": ("epochs", "plateau"),
    "execution.backend": ("auto", "gloo", "nccl"),
    "execution.device": ("auto", "cpu", "cuda"),
    "execution.precision": ("fp32", "bf16", "fp16", "fp64"),
    "execution.placement": ("free", "stages"),
    "execution.grad_sync": ("flat", "ddp"),
}
_POSITIVE = (
    "model.teacher.num_classes", "model.teacher.train_epochs", "data.image_size", "data.channels", "data.batch_size",
    "data.num_samples", "distill.epochs", "distill.paths_per_step", "distill.patience", "execution.workers",
    "execution.timeout_s", "distill.lr", "model.student.width_mult", "execution.queue_depth",
)


def _validate_vit(student: StudentConfig) -> None:
    """The options of ``kind: vit`` (heads, mlp_ratios) are set only for it, each a non-empty list of ints >= 1."""
    for key in ("heads", "mlp_ratios"):
        values = getattr(student, key)
        if values is None:
            continue
        if student.kind != "vit" or student.class_path is not None:
            raise ConfigError(f"model.student.{key} = {values!r} is an option of kind: vit, but kind = "
                              f"{student.kind!r}{' with class_path' if student.class_path else ''}; drop it or set "
                              "kind: vit")
        if not isinstance(values, list) or not values or \
                any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ConfigError(f"model.student.{key} = {values!r} must be a non-empty list of ints >= 1")


def _validate_donna(student: StudentConfig) -> None:
    """The options of ``kind: donna`` are set only for it (``widths`` for ``vit`` too), and those of ``dna`` /
    ``fixed`` only for those."""
    _validate_vit(student)
    if student.kind not in ("donna", "vit") or student.class_path is not None:
        for key in ("widths", "attention"):
            if getattr(student, key) is not None:
                raise ConfigError(f"model.student.{key} = {getattr(student, key)!r} is an option of kind: donna, "
                                  f"but kind = {student.kind!r}{' with class_path' if student.class_path else ''}; "
                                  "drop it or set kind: donna")
        return
    if student.kind == "vit":
        if student.attention is not None:
            raise ConfigError(f"model.student.attention = {student.attention!r} is an option of kind: donna; a vit "
                              "block's layers are all self-attention — drop it")
        if student.identity or student.width_mult != 1.0:
            raise ConfigError("model.student.identity / width_mult are options of kind: dna; a vit block chooses its "
                              "depth and embedding width instead — drop them")
        widths = student.candidate_widths()
        if not widths or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 for w in widths):
            raise ConfigError(f"model.student.widths = {student.widths!r} must be a non-empty list of numbers > 0 "
                              "(embedding widths relative to the teacher's token width, e.g. [0.5, 0.75, 1.0])")
        return
    if student.identity:
        raise ConfigError("model.student.identity = true is an option of kind: dna; a DONNA block chooses its depth "
                          "(1..layers) instead — drop identity")
    if student.width_mult != 1.0:
        raise ConfigError(f"model.student.width_mult = {student.width_mult!r} is an option of kind: dna; DONNA "
                          "blocks choose their inner width — give candidates as widths (e.g. [0.5, 0.75, 1.0])")
    widths = student.candidate_widths()
    if not widths or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 for w in widths):
        raise ConfigError(f"model.student.widths = {student.widths!r} must be a non-empty list of numbers > 0 "
                          "(inner widths relative to the teacher block's output width, e.g. [0.5, 0.75, 1.0])")
    attention = student.candidate_attention()
    unknown = [a for a in attention if a not in DONNA_ATTENTION]
    if not attention or unknown or len(set(attention)) != len(attention):
        raise ConfigError(f"model.student.attention = {student.attention!r} must be a non-empty list of distinct "
                          f"values of {list(DONNA_ATTENTION)}" + (f"; {unknown} are not" if unknown else ""))


def validate(config: Config) -> None:
    """Check value ranges and choices; raise :class:`ConfigError` naming the key."""
    for key, valid in _CHOICES.items():
        value = _get(config, key)
        if value not in valid:
            raise ConfigError(f"{key} = {value!r} is not valid; choose one of {list(valid)}")
    for key in _POSITIVE:
        value = _get(config, key)
        if value <= 0:
            raise ConfigError(f"{key} = {value!r} must be > 0")
    for key in ("distill.max_steps_per_epoch", "execution.threads_per_worker", "execution.checkpoint_every"):
        value = _get(config, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key} = {value!r} must be > 0 (or null)")
    if config.execution.plan is not None and config.execution.boundaries is not None:
        raise ConfigError(f"execution.plan = {config.execution.plan!r} and execution.boundaries = "
                          f"{config.execution.boundaries!r} both set; a plan fixes the stages, give one of them")
    if config.execution.precision == "fp16" and config.execution.device == "cpu":
        raise ConfigError("execution.precision = 'fp16' needs CUDA, but execution.device = 'cpu'; use precision: "
                          "bf16 (or fp32) on CPU, or device: cuda")
    if config.execution.memory_limit_mb is not None and config.execution.memory_limit_mb <= 0:
        raise ConfigError(f"execution.memory_limit_mb = {config.execution.memory_limit_mb} must be > 0")
    if not 0 <= config.distill.min_improvement < 1:
        raise ConfigError(f"distill.min_improvement = {config.distill.min_improvement!r} must be in [0, 1) (a relative "
                          "loss decrease, e.g. 0.01)")
    if config.data.num_workers < 0:
        raise ConfigError(f"data.num_workers = {config.data.num_workers} must be >= 0")
    student = config.model.student
    for key, values in (("kernels", student.kernels), ("expansions", student.candidate_expansions())):
        if not isinstance(values, list) or not values or \
                any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
            raise ConfigError(f"model.student.{key} = {values!r} must be a non-empty list of positive ints")
    _validate_donna(student)
    if any(k % 2 == 0 for k in student.kernels):
        raise ConfigError(f"model.student.kernels = {student.kernels!r} must be odd (same padding)")
    if student.class_path is not None and student.kind != "dna":
        raise ConfigError(f"model.student.kind = {student.kind!r} and class_path = {student.class_path!r} both set; "
                          "kind names a built-in block space and class_path your own — give one (a factory returns "
                          "a plain nn.Module for a fixed block)")
    if student.init_args and student.class_path is None:
        raise ConfigError(f"model.student.init_args = {student.init_args!r} is set without class_path")
    if student.module is not None and (student.class_path is not None or student.kind != "dna"):
        raise ConfigError(f"model.student.module = {student.module!r} is the student space itself; drop class_path / "
                          "kind")
    teacher = config.model.teacher
    from .lightning.options import check_trainer_options

    problem = check_trainer_options(teacher.train_precision, teacher.train_devices, teacher.train_strategy)
    if problem:
        raise ConfigError(f"model.teacher.train_{problem}")
    sources = [key for key in ("arch", "class_path", "module") if getattr(teacher, key) is not None]
    if len(sources) > 1:
        raise ConfigError(f"model.teacher sets {' and '.join(sources)}; give one of arch, class_path and module")
    if teacher.init_args and teacher.class_path is None:
        raise ConfigError(f"model.teacher.init_args = {teacher.init_args!r} is set without class_path; use kwargs "
                          "for an arch's constructor")
    if teacher.kwargs and (teacher.class_path or teacher.module):
        raise ConfigError(f"model.teacher.kwargs = {teacher.kwargs!r} apply to an arch; give a class_path its "
                          "arguments as init_args")
    bad = [b for b in teacher.boundaries or [] if isinstance(b, bool) or not isinstance(b, (int, str))]
    if bad:
        raise ConfigError(f"model.teacher.boundaries = {teacher.boundaries!r}: {bad} are neither module names nor "
                          "child indices")
    for key in ("leaf_modules", "autowrap_functions"):
        names = getattr(teacher, key)
        if not isinstance(names, list) or any(not isinstance(n, str) or not n for n in names):
            raise ConfigError(f"model.teacher.{key} = {names!r} must be a list of names or import paths")
    if teacher.module is not None and (teacher.checkpoint or teacher.weights):
        raise ConfigError("model.teacher.module holds the weights already; drop checkpoint / weights")
    if config.data.name is not None and config.data.class_path is not None:
        raise ConfigError(f"data.name = {config.data.name!r} and data.class_path = {config.data.class_path!r} both "
                          "set; give one of them")
    name = config.data.name
    if name is not None and name not in DATASET_NAMES and name.lower() not in torchvision_names():
        raise ConfigError(f"data.name = {name!r} is not valid; choose one of {list(DATASET_NAMES)}, a torchvision "
                          f"data set with a train flag or split (e.g. MNIST, SVHN), or set data.class_path")
    if config.data.init_args and config.data.class_path is None:
        raise ConfigError(f"data.init_args = {config.data.init_args!r} is set without data.class_path")
    if config.data.name in ("cifar10", "imagefolder") and config.data.root is None:
        raise ConfigError(f"data.root must name the {config.data.name} folder (data.name = {config.data.name!r})")
    has_weights = any(getattr(teacher, key) is not None for key in ("module", "checkpoint", "weights"))
    if teacher.pretrained and not has_weights:
        raise ConfigError("model.teacher has no weights (neither checkpoint, weights nor module): the teacher would "
                          "be randomly initialised; name its trained weights (checkpoint: PATH, with train_if_missing: "
                          "true to train it here first), or set model.teacher.pretrained: false to distil a random "
                          "teacher on purpose")
    if not teacher.pretrained and has_weights:
        raise ConfigError("model.teacher.pretrained is false but the teacher has weights (checkpoint, weights or "
                          "module); drop one of them")


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {where + unknown[0]!r} in the config; valid keys here: {sorted(fields)}")
    values = {}
    for name, value in raw.items():
        key = where + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key + ".")
        else:
            values[name] = _check_type(value, hint, key)
    return cls(**values)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    allowed = _allowed_types(hint)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = isinstance(value, tuple(t for t in allowed if t is not type(None)))
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{key} = {value!r} has type {type(value).__name__}; expected {names}")
    return value


def _allowed_types(hint: Any) -> tuple:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _allowed_types(arg))
    if origin is not None:
        return (origin,)
    return (hint,)
