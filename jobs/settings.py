"""Problems with a command's settings, each naming the setting as its reader knows it.

A validator writes a problem once, with the settings it names as ``Setting`` parts::

    Problem.of(Setting("dataset.context_size", 1), " leaves no room for text. Use ",
               Setting("dataset.context_size", 2), " or more, or ", Setting("dataset.prepend_bos", False), ".")

and raises every problem together as one ``SettingsError``. Its text, for Python callers, names
the config's fields (``ExtractConfig.dataset.context_size=1 leaves no room ...``);
``for_command_line()`` gives the same problems naming the flags (``--context-size 1 leaves no room
... or --no-prepend-bos.``), from the command's table of ``Flag``s below. A problem that another
module wrote as plain text naming flags (``--dataset x.jsonl is empty``) is read back into parts
with ``Problem.from_text``, so Python callers get field names there too.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from store.errors import ConfigError

_MISSING = object()


@dataclass(frozen=True)
class Setting:
    """A setting named in a problem, with the value it is shown with (if any)."""

    path: str  # the field, e.g. "dataset.context_size"; "saes[1]" for one item of a tuple
    value: Any = _MISSING
    quoted: bool = False  # on the command line, show the value as Python writes it ('int8')

    @property
    def field(self) -> str:
        return self.path.split("[")[0]


@dataclass(frozen=True)
class Flag:
    """How the command line spells one setting."""

    name: str  # "--context-size"
    switches: dict = field(default_factory=dict)  # value -> its own flag ({False: "--no-prepend-bos"})
    show: Callable[[Any], str] = str  # a value as the flag takes it

    def render(self, setting: Setting) -> str:
        if isinstance(setting.value, bool) and setting.value in self.switches:
            return self.switches[setting.value]
        if setting.value is _MISSING or not self.name:
            return self.name or "/".join(self.switches.values())
        shown = repr(setting.value) if setting.quoted else self.show(setting.value)
        return f"{self.name} {shown}"


@dataclass(frozen=True)
class Problem:
    """One problem's text, in parts: plain text and the settings it names."""

    parts: tuple[str | Setting, ...]

    @classmethod
    def of(cls, *parts: str | Setting) -> Problem:
        return cls(tuple(parts))

    @classmethod
    def from_text(cls, text: str, flags: dict[str, Flag]) -> Problem:
        """A problem written as text that names flags: each flag of ``flags`` becomes its setting."""
        by_flag: dict[str, Setting] = {}
        for path, flag in flags.items():
            if flag.name:
                by_flag[flag.name] = Setting(path)
            for value, switch in flag.switches.items():
                by_flag[switch] = Setting(path, value)
        parts: list[str | Setting] = []
        at = 0
        for found in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
            if found.group() in by_flag:
                parts += [text[at:found.start()], by_flag[found.group()]]
                at = found.end()
        parts.append(text[at:])
        return cls(tuple(p for p in parts if p != ""))

    def render(self, name: Callable[[Setting], str]) -> str:
        return "".join(p if isinstance(p, str) else name(p) for p in self.parts)


class SettingsError(ConfigError):
    """A ConfigError about a config's settings: its text names the config's fields, as Python
    callers know them; ``for_command_line()`` names the flags instead."""

    def __init__(self, config_name: str, problems: Iterable[Problem], flags: dict[str, Flag]):
        self.config_name, self.flags, self.parts = config_name, flags, list(problems)
        super().__init__([p.render(self._python_name) for p in self.parts])

    def __reduce__(self):  # pickled (by Ray, say) as the ConfigError its text is
        return ConfigError, (self.problems,)

    def _python_name(self, setting: Setting) -> str:
        name = f"{self.config_name}.{setting.path}"
        return name if setting.value is _MISSING else f"{name}={setting.value!r}"

    def _flag_name(self, setting: Setting) -> str:
        return self.flags[setting.field].render(setting)

    def for_command_line(self) -> ConfigError:
        """The same problems, naming each setting by its flag (and keeping any notes)."""
        error = ConfigError([p.render(self._flag_name) for p in self.parts])
        for note in getattr(self, "__notes__", []):
            error.add_note(note)
        return error


def problems_of(error: ConfigError, flags: dict[str, Flag]) -> list[Problem]:
    """Another module's ConfigError, as problems (its flags read back as settings)."""
    if isinstance(error, SettingsError):
        return list(error.parts)
    return [Problem.from_text(text, flags) for text in error.problems]


def as_settings_error(config_name: str, error: ConfigError, flags: dict[str, Flag]) -> SettingsError:
    """Another module's ConfigError about a config's settings, naming them as a SettingsError does."""
    converted = SettingsError(config_name, problems_of(error, flags), flags)
    for note in getattr(error, "__notes__", []):
        converted.add_note(note)
    return converted


def credential_problems(sources: Iterable[tuple[str, Any]]) -> list[Problem]:
    """Each (setting, text) whose text is a URL with credentials in it: a source or name that is
    recorded, written into files or shown as given would carry them there. Shown masked."""
    from store.location import CREDENTIALS_FIX, credentials_in, mask_url

    return [Problem.of(Setting(path, mask_url(text)), f" holds credentials ({found}). {CREDENTIALS_FIX}")
            for path, text in sources if isinstance(text, str) and (found := credentials_in(text))]


def refuse_credentials(sources: dict[str, Any]) -> None:
    """``credential_problems`` of command-line values, by flag, raised as one ConfigError."""
    problems = credential_problems(sources.items())
    if problems:
        raise ConfigError([p.render(lambda s: f"{s.path} {s.value}") for p in problems])


def cores_problems(cpus_per_worker: Any) -> list[Problem]:
    """``resources.cpus_per_worker``, when given, is a number of cores above 0 (Ray takes fractions)."""
    from store.arguments import is_finite_number

    if cpus_per_worker is None or (is_finite_number(cpus_per_worker) and cpus_per_worker > 0):
        return []
    return [Problem.of(Setting("resources.cpus_per_worker", cpus_per_worker),
                       " must be a number of CPU cores above 0, such as 2 or 0.5.")]


def positive(values: dict[str, Any]) -> list[Problem]:
    """Each whole-number setting given (not None) that is not a positive whole number."""
    problems = []
    for path, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and value > 0:
                problems.append(Problem.of(Setting(path), f" must be a whole number, got {value!r}: write {int(value)}."))
            else:
                problems.append(Problem.of(Setting(path), f" must be a positive whole number, got {value!r}."))
        elif value <= 0:
            problems.append(Problem.of(Setting(path), f" must be positive, got {value}."))
    return problems


def wrong_types(config: Any, specs: dict[str, type]) -> list[Problem]:
    """A spec field holding something other than its spec (a path where a StoreSpec belongs, say)."""
    name = type(config).__name__
    problems = []
    for key, spec in specs.items():
        value = getattr(config, key)
        if not isinstance(value, spec):
            problems.append(Problem.of(
                Setting(key), f" must be a {spec.__name__}, got {type(value).__name__} {value!r}. "
                f"Write {spec.__name__}({value!r}), or build the config with {name}.build({key}={value!r}, ...)."))
    return problems


# -- each command's flags, by setting -----------------------------------------------------------------

RESOURCE_FLAGS = {
    "resources.workers": Flag("--workers"),
    "resources.use_gpu": Flag("", {True: "--gpu", False: "--cpu"}),
    "resources.cpus_per_worker": Flag("--cpus-per-worker"),
    "resources.batch_size": Flag("--batch-size"),
    "resources.address": Flag("--address"),
    "resources.progress": Flag("", {False: "--no-progress"}),
}

EXTRACT_FLAGS = {
    "model": Flag("--model"),
    "model.name": Flag("--model"),
    "model.dtype": Flag("--model-dtype"),
    "saes": Flag("--sae"),
    "dataset": Flag("--dataset"),
    "dataset.name": Flag("--dataset"),
    "dataset.split": Flag("--split"),
    "dataset.subset": Flag("--subset"),
    "dataset.text_column": Flag("--text-column"),
    "dataset.tokens_column": Flag("--tokens-column"),
    "dataset.context_size": Flag("--context-size"),
    "dataset.max_tokens": Flag("--max-tokens"),
    "dataset.prepend_bos": Flag("", {True: "--prepend-bos", False: "--no-prepend-bos"}),
    "store": Flag("--store"),
    "store.path": Flag("--store"),
    "store.value_dtype": Flag("--value-dtype"),
    "store.top_k": Flag("--top-k"),
    "store.shard_tokens": Flag("--shard-tokens"),
    "store.index": Flag("", {False: "--no-index"}),
    "store.overwrite": Flag("", {True: "--overwrite"}),
    **RESOURCE_FLAGS,
}

SWEEP_FLAGS = {
    "name": Flag("--name"),
    "store": Flag("--store"),
    "store.path": Flag("--store"),
    "store.prompts_per_part": Flag("--prompts-per-part"),
    "store.features_per_part": Flag("--features-per-part"),
    "store.overwrite": Flag("", {True: "--overwrite"}),
    "prompts": Flag("--prompts"),
    "prompts.file": Flag("--prompts"),
    "prompts.rows": Flag("--rows", show=lambda rows: f"{rows[0]}:{rows[1]}"),
    "model": Flag("--model"),
    "sae": Flag("--sae"),
    "sae_name": Flag("--sae-name"),
    "ablation": Flag("--ablation"),
    "ablation.kind": Flag("--ablation"),
    "ablation.metric": Flag("--metric"),
    "ablation.position": Flag("--position", show=lambda p: "all" if p is None else str(p)),
    "ablation.features": Flag("--features", show=lambda fs: ",".join(map(str, fs))),
    "ablation.use_error_term": Flag("", {True: "--error-term"}),
    "ablation.method": Flag("--method"),
    "ablation.verify_top": Flag("--verify-top"),
    **RESOURCE_FLAGS,
}


def finite_float(text: str) -> float:
    """An argparse type: a number that is neither nan nor infinite (float() takes both)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def default_of(config: type, setting: str) -> Any:
    """A setting's default, read from its spec (``default_of(ExtractConfig, "context_size")``: 128), for
    help texts that must agree with the Python API."""
    import dataclasses

    path = config.settings()[setting]
    owner = config
    if "." in path:
        spec, setting = path.split(".")
        owner = config.SPECS[spec]
    elif setting in config.SPECS:
        owner, setting = config.SPECS[setting], config.PRIMARY[setting]
    f = next(f for f in dataclasses.fields(owner) if f.name == setting)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
