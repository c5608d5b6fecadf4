"""What each command takes, as frozen specs nested by concern, each default declared once.

``ExtractConfig`` is a model, its SAEs, a dataset, a store and the resources to use;
``SweepConfig`` is a model and an SAE, prompts, an ablation, a store and resources. Nothing
here checks a value: ``jobs.extract.validate`` and ``jobs.sweep.validate`` do, once, and report
every problem together, naming each field as the caller knows it (``ExtractConfig.dataset.context_size``
from Python, ``--context-size`` on the command line).

From a notebook, ``build`` takes the settings by their short names and puts each where it belongs::

    cfg = ExtractConfig.build(model="gpt2-small", saes=["gpt2-small-res-jb/blocks.8.hook_resid_pre"],
                              dataset="NeelNanda/pile-10k", store="gpt2.zarr", max_tokens=1_000_000)
    cfg.dataset.context_size      # 128, the default
    cfg.changed(context_size=64)  # a copy with one setting changed

The workers (``pipeline.worker``, ``pipeline.sweep_worker``) get these specs as they are, inside
their job, with what the driver resolved beside them: nothing is copied field by field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.dataset import DEFAULT_SHARD_TOKENS, DatasetSpec
from pipeline.metric_names import DEFAULT_METRIC
from store.stats import DEFAULT_TOP_K

DEFAULT_BATCH_SIZE = 32  # windows (extract) or prompt copies (sweep) per forward pass
DEFAULT_VALUE_DTYPE = "bfloat16"


@dataclass(frozen=True)
class ModelSpec:
    """The TransformerLens model (or Hugging Face directory) to run."""

    name: str  # a TransformerLens name, latentstore's model directory, or a save_pretrained directory
    dtype: str | None = None  # float32, float16 or bfloat16 for the model and SAEs; None: the model's own


@dataclass(frozen=True)
class StoreSpec:
    """Where an extraction is written, and everything about the run that shapes the store."""

    path: str  # a local path or an fsspec URL
    value_dtype: str = DEFAULT_VALUE_DTYPE  # precision of stored activations
    top_k: int = DEFAULT_TOP_K  # top activations kept per feature in the statistics
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # about this many tokens per shard, whole windows (one store part)
    index: bool = True  # build the feature-major index at the end
    overwrite: bool = False  # replace a store that holds a different run


@dataclass(frozen=True)
class Resources:
    """How much of the cluster a command uses. None of it changes what is written."""

    workers: int | None = None  # Ray workers; None: one per GPU in the cluster now, or 1 on a CPU-only cluster
    use_gpu: bool | None = None  # None: GPU workers if the cluster has GPUs now (say True to scale from zero)
    cpus_per_worker: float | None = None  # CPU workers only; None: share the machine's cores
    batch_size: int = DEFAULT_BATCH_SIZE  # windows (extract) or prompt copies (sweep) per forward pass
    address: str | None = None  # a Ray cluster to join; None: RAY_ADDRESS, else start one locally
    progress: bool = True  # show a progress bar

    @property
    def cpus_wanted(self) -> float:
        """Logical CPUs a local Ray instance needs for these workers."""
        return (self.workers or 1) * (self.cpus_per_worker or 1)


class _Settings:
    """``build`` and ``changed`` for a config of nested specs: each setting by its short name.

    A spec field's name takes a spec, or the value of the spec's main field (``PRIMARY``:
    ``store="x.zarr"`` is ``store=StoreSpec("x.zarr")``); each other field of a spec is set by its
    own name (``context_size=64``), or by its name in ``ALIASES``."""

    SPECS: ClassVar[dict[str, type]] = {}  # the config's fields that hold specs, and their types
    PRIMARY: ClassVar[dict[str, str]] = {}  # a spec field -> its field set by a plain value
    ALIASES: ClassVar[dict[str, str]] = {}  # short names that are not a field's own
    REQUIRED_HINT: ClassVar[str] = ""  # said when ``build`` lacks a setting that has no default

    @classmethod
    def settings(cls) -> dict[str, str]:
        """Every short name, and the field it sets (a path such as ``dataset.context_size``)."""
        names: dict[str, str] = {}
        for f in dataclasses.fields(cls):
            names[f.name] = f.name
            spec = _spec_type(cls, f.name)
            if spec is not None:
                for sub in dataclasses.fields(spec):
                    path = f"{f.name}.{sub.name}"
                    if sub.name == cls.PRIMARY.get(f.name) or path in cls.ALIASES.values():
                        continue
                    assert sub.name not in names, f"{cls.__name__}: two settings named {sub.name}"
                    names[sub.name] = path
        names.update(cls.ALIASES)
        return names

    @classmethod
    def build(cls, **settings: Any):
        """The config from settings by their short names (see ``settings()``); an unknown name is refused."""
        from store.errors import ConfigError

        paths = cls._paths(settings, "build")
        top = {k: v for k, v in paths.items() if "." not in k}
        for name, primary in cls.PRIMARY.items():  # a spec given by its main value is made from it
            if f"{name}.{primary}" in paths and name not in top:
                top[name] = cls.SPECS[name](**{primary: paths.pop(f"{name}.{primary}")})
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in top
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{cls.__name__}.build needs {', '.join(missing)}, which have no default: write "
                              f"{cls.__name__}.build({', '.join(f'{name}=...' for name in missing)}, ...).{cls.REQUIRED_HINT}")
        return cls(**top)._with({k: v for k, v in paths.items() if "." in k})

    @classmethod
    def _paths(cls, settings: dict[str, Any], caller: str) -> dict[str, Any]:
        """Each setting's value by the field it sets (``dataset.context_size``); a spec's main value
        (``store="x.zarr"``) sets the spec's main field (``store.path``)."""
        from store.errors import ConfigError, did_you_mean

        names = cls.settings()
        unknown = [k for k in settings if k not in names]
        if unknown:
            raise ConfigError([f"{cls.__name__}.{caller} has no setting {k!r}; its settings are: "
                               f"{did_you_mean(k, names)}" for k in unknown])
        paths = {}
        for name, value in settings.items():
            spec = _spec_type(cls, name)
            plain = spec is not None and not isinstance(value, spec)
            paths[f"{name}.{cls.PRIMARY[name]}" if plain else names[name]] = value
        return paths

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The config from its nested dict (``dataclasses.asdict``'s, or that read back from JSON, whose
        lists become tuples); an unknown key is refused with the valid ones."""
        from store.errors import ConfigError, did_you_mean

        problems: list[str] = []

        def known(owner: type, values: dict[str, Any], where: str) -> dict[str, Any]:
            names = [f.name for f in dataclasses.fields(owner)]
            problems.extend(f"{where} has no field {k!r}; its fields are: {did_you_mean(k, names)}"
                            for k in values if k not in names)
            return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}

        fields = known(cls, data, cls.__name__)
        for name, spec in cls.SPECS.items():
            if isinstance(fields.get(name), dict):
                fields[name] = spec(**known(spec, fields[name], f"{cls.__name__}.{name}"))
        if problems:
            raise ConfigError(problems)
        return cls(**fields)

    def changed(self, **settings: Any):
        """A copy with these settings changed, by their short names (as ``build`` takes them)."""
        return self._with(self._paths(settings, "changed"))

    def _with(self, changes: dict[str, Any]):
        top = {k: v for k, v in changes.items() if "." not in k}
        config = dataclasses.replace(self, **top) if top else self
        by_spec: dict[str, dict[str, Any]] = {}
        for path, value in changes.items():
            if "." in path:
                spec, name = path.split(".")
                by_spec.setdefault(spec, {})[name] = value
        return dataclasses.replace(config, **{spec: dataclasses.replace(getattr(config, spec), **values)
                                              for spec, values in by_spec.items()})


def _spec_type(cls, name: str) -> type | None:
    """The spec class of a config field, or None for a plain field."""
    return cls.SPECS.get(name)


@dataclass(frozen=True)
class ExtractConfig(_Settings):
    """Everything `latentstore extract` takes. Validated once, by ``jobs.extract.validate``."""

    model: ModelSpec
    saes: tuple[str, ...]  # one source per SAE: RELEASE/SAE_ID, a directory, or PATH/params.npz@HOOK
    dataset: DatasetSpec
    store: StoreSpec
    resources: Resources = field(default_factory=Resources)

    SPECS: ClassVar[dict[str, type]] = {"model": ModelSpec, "dataset": DatasetSpec, "store": StoreSpec,
                                        "resources": Resources}
    PRIMARY: ClassVar[dict[str, str]] = {"model": "name", "dataset": "name", "store": "path"}
    ALIASES: ClassVar[dict[str, str]] = {"model_dtype": "model.dtype"}
    REQUIRED_HINT: ClassVar[str] = (" The command line's embedded default is model=str(pipeline.default.MODEL_DIR), "
                                    "saes=[str(p) for p in pipeline.default.default_sae_dirs()], "
                                    "dataset=str(pipeline.default.TRAIN_CORPUS).")


# -- sweeps ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSpec:
    """The prompts of a sweep: rows of the store, or a file. Exactly one."""

    file: str | None = None  # a jsonl file with `prompt` (and `answer`, `wrong_answer`) per line
    rows: tuple[int, int] | None = None  # [start, stop) dataset rows of the store, as prompts


@dataclass(frozen=True)
class AblationSpec:
    """What a sweep ablates, how, and what it measures."""

    kind: str | float = "zero"  # "zero", "mean" (store prompts) or a scale factor
    metric: str = DEFAULT_METRIC  # logit_diff (needs answers), loss, kl
    position: int | None = -1  # the ablated position, negative from the end; None: every position
    features: tuple[int, ...] | None = None  # None: every live feature
    use_error_term: bool = False  # splice the SAE with its error term
    method: str = "exact"  # or "attribution"
    verify_top: int | None = None  # with attribution: recompute the N strongest features exactly


@dataclass(frozen=True)
class SweepStoreSpec:
    """Where a sweep is written, and how it is split into parts (the unit of work and of resuming)."""

    path: str  # with prompts as rows, also where the prompts come from
    prompts_per_part: int = 16
    features_per_part: int = 256
    overwrite: bool = False  # replace a different sweep of the same name


@dataclass(frozen=True)
class SweepConfig(_Settings):
    """Everything `latentstore sweep` takes. Validated once, by ``jobs.sweep.validate``."""

    name: str  # the sweep's name within the store
    store: SweepStoreSpec
    prompts: PromptSpec = field(default_factory=PromptSpec)
    model: str | None = None  # None: the store's model
    sae: str | None = None  # an SAE source, [NAME=]SOURCE (see pipeline.saes); None: the store's ``sae_name``
    sae_name: str | None = None  # the store's SAE, by name (or by a hook with one SAE); needed if it has several
    ablation: AblationSpec = field(default_factory=AblationSpec)
    resources: Resources = field(default_factory=Resources)

    SPECS: ClassVar[dict[str, type]] = {"store": SweepStoreSpec, "prompts": PromptSpec, "ablation": AblationSpec,
                                        "resources": Resources}
    PRIMARY: ClassVar[dict[str, str]] = {"store": "path", "prompts": "file", "ablation": "kind"}
