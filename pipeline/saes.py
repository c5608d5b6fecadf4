"""Loading SAEs: sae_lens pretrained releases, sae_lens directories, Gemma Scope ``params.npz`` files.

What follows ``--sae`` is ``[NAME=]SOURCE``, parsed by ``SAESource.parse``. The name keys the
SAE's data in the store; without one, the SAE is named by the hook it reads, and two SAEs at one
hook need names (``--sae res_16k=DIR16 --sae res_65k=DIR65``). The source takes one of three forms:

- ``DIR``: an existing directory as sae_lens's ``SAE.save_model`` writes it,
  ``cfg.json`` and ``sae_weights.safetensors``;
- ``PATH.npz@HOOK``: a Gemma Scope ``params.npz`` (arrays ``W_enc [d_in, d_sae]``,
  ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``) and the TransformerLens
  hook it reads, which the file itself does not record;
- ``RELEASE/SAE_ID``: an SAE from sae_lens's pretrained directory, fetched from the hub.

Weights only ever load from safetensors, or from npz with pickles refused.
``read_sae_config`` describes an SAE without loading its weights, so that a run can be
validated before any work is spent.

Every architecture sae_lens registers loads, with two kinds of SAE beyond the plain one:

- **Transcoders** (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
  ``jumprelu_skip_transcoder``) read one hook (``metadata.hook_name``) and reconstruct another
  (``metadata.hook_name_out``). Their latents are ``encode`` of the input hook's activation;
  spliced in, their output ``decode(encode(x))`` (plus ``x @ W_skip.T`` for skip transcoders)
  replaces the output hook's activation. ``TranscoderSplice`` writes that as plain hooks.
- **Run-time normalisation** (``normalize_activations`` ``layer_norm`` or
  ``constant_norm_rescale``): the SAE normalises each token's input and its decoder undoes it,
  so a feature adds ``W_dec[f]`` times a per-token factor (``decoder_scale``). sae_lens applies
  no run-time transform for ``expected_average_only_in`` or ``covariance_whitening`` (their
  factors are folded into the weights when loaded), so those decode linearly.

BatchTopK and Matryoshka SAEs are saved by sae_lens as JumpReLU SAEs, and load as such.
Temporal SAEs are refused: their codes depend on earlier tokens, and their ``decode`` is not
their reconstruction.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting, load_sae_config_from_huggingface
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from sae_lens.registry import SAE_CLASS_REGISTRY
from sae_lens.saes.sae import SAEConfig, SAEMetadata
from sae_lens.saes.transcoder import Transcoder
from sae_lens.util import DTYPE_MAP

from pipeline.models import PICKLE_SUFFIXES, hook_width, hub_unreachable, load_json_object, load_safetensors
from store.errors import ConfigError, did_you_mean
from store.format import sae_name_problem

SAE_FORMS = (
    "DIR: a directory written by sae_lens's SAE.save_model (cfg.json, sae_weights.safetensors)",
    "PATH.npz@HOOK: a Gemma Scope params.npz and the hook it reads, e.g. params.npz@blocks.12.hook_resid_post",
    "RELEASE/SAE_ID: a sae_lens pretrained SAE, e.g. gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical",
)
TRANSCODER_ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
REFUSED_ARCHITECTURES = {
    "temporal": "its codes depend on the tokens before each one (attention over the context), and its "
                "decode is not its reconstruction; latentstore encodes tokens independently",
}
RUN_TIME_NORMALIZATIONS = ("layer_norm", "constant_norm_rescale")
"""``normalize_activations`` values under which sae_lens normalises each token at run time."""
NPZ_ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@dataclass(frozen=True)
class SAESource:
    """What the user wrote after --sae, parsed. Build it with ``parse``, which validates it."""

    kind: Literal["pretrained", "disk", "npz"]
    location: str
    """The release for ``pretrained``; the path, as written, for ``disk`` and ``npz``."""
    sae_id: str | None = None
    """The SAE's id within its release; ``pretrained`` only."""
    hook: str | None = None
    """The hook given by the user; ``npz`` only (other kinds record their hook in their config)."""
    name: str | None = None
    """The name given by the user (``NAME=SOURCE``); None: the SAE is named by its hook."""

    @classmethod
    def parse(cls, text: str) -> SAESource:
        """``[NAME=]SOURCE``: a name is what comes before the first ``=``, unless the whole text is a
        directory, or the name would hold a ``/`` and what follows is no file (so that a path such as
        ``runs/lr=3e-4/sae`` stays a source, and ``res/16k=DIR`` is a bad name, said as such)."""
        name, eq, rest = text.partition("=")
        if eq and not Path(text).is_dir() and ("/" not in name or Path(rest.rpartition("@")[0] or rest).exists()):
            if problem := sae_name_problem(name):
                raise ConfigError(f"--sae {text}: {problem}.")
            return replace(cls._parse_source(rest), name=name)
        return cls._parse_source(text)

    @classmethod
    def _parse_source(cls, text: str) -> SAESource:
        if text and Path(text).is_dir():
            return cls("disk", text)
        path, at, hook = text.rpartition("@")
        if at and path.endswith(".npz"):
            if not hook:
                raise ConfigError(_npz_needs_hook(text, path))
            if not Path(path).is_file():
                raise ConfigError(f"--sae {text}: no file {path}.")
            return cls("npz", path, hook=hook)
        if text.endswith(".npz"):
            raise ConfigError(_npz_needs_hook(text, text))
        if text.startswith(("/", "./", "../", "~")):
            raise ConfigError(f"--sae {text}: no such directory. A disk SAE is a directory written by "
                              "sae_lens's SAE.save_model (cfg.json + sae_weights.safetensors).")
        release, slash, sae_id = text.partition("/")
        if slash and release:
            _check_pretrained(text, release, sae_id)
            return cls("pretrained", release, sae_id=sae_id)
        forms = "\n".join(f"  {form}" for form in SAE_FORMS)
        raise ConfigError(f"--sae {text!r} is not an SAE this tool can load. Accepted forms:\n{forms}")

    def __str__(self) -> str:
        """The source as the user wrote it, without its name."""
        if self.kind == "pretrained":
            return f"{self.location}/{self.sae_id}"
        if self.kind == "npz":
            return f"{self.location}@{self.hook}"
        return self.location


@dataclass(frozen=True)
class SAEDescription:
    """An SAE as far as a run needs to know it before loading weights."""

    name: str
    """What the store keys its data by: the name the user gave, else its hook."""
    source: str
    """``str(SAESource)``: what the user wrote."""
    architecture: str
    """sae_lens's architecture name: ``standard``, ``jumprelu``, ``topk``, ..."""
    hook: str
    """The TransformerLens hook whose activations the SAE encodes."""
    d_in: int
    d_sae: int
    prepend_bos: bool | None
    """Whether the SAE was trained on inputs starting with BOS; None when its config does not say."""
    config: dict[str, Any]
    """sae_lens's config as a JSON-serialisable dict, without the device."""
    hook_out: str | None = None
    """A transcoder's output hook (``metadata.hook_name_out``), whose activation it reconstructs;
    None for an SAE, which reconstructs the hook it reads."""
    d_out: int | None = None
    """A transcoder's output width; None for an SAE."""


def read_sae_config(source: SAESource) -> SAEDescription:
    """Describe the SAE without loading its weights (a pretrained SAE may still need the hub)."""
    if source.kind == "disk":
        cfg = _config_from_dict(source, handle_config_defaulting(_read_disk_config(source)))
    elif source.kind == "npz":
        cfg = _npz_config(source)
    else:
        try:
            raw = load_sae_config_from_huggingface(source.location, source.sae_id)
        except OSError as e:  # huggingface_hub's network and cache errors are OSErrors
            raise _hub_unreachable(source, e) from e
        cfg = _config_from_dict(source, raw)
    config = cfg.to_dict()
    del config["device"]  # where to run is the loader's choice, not the SAE's
    transcoder = cfg.architecture() in TRANSCODER_ARCHITECTURES
    hook = _hook_name(source, cfg)
    return SAEDescription(
        name=source.name or hook,
        source=str(source),
        architecture=cfg.architecture(),
        hook=hook,
        d_in=cfg.d_in,
        d_sae=cfg.d_sae,
        prepend_bos=cfg.metadata.get("prepend_bos"),
        config=config,
        hook_out=_hook_name_out(source, cfg) if transcoder else None,
        d_out=cfg.d_out if transcoder else None,
    )


def output_hook_problems(text: str, sae: SAEDescription, valid_hooks: set[str], model_cfg: Any,
                         model_name: str) -> list[str]:
    """What is wrong with a transcoder's output hook on this model: missing, or of another width."""
    if sae.hook_out is None:
        return []
    if sae.hook_out not in valid_hooks:
        return [f"--sae {text}: it is a transcoder that writes to hook {sae.hook_out!r} "
                f"(metadata.hook_name_out), which model {model_name} does not have. Hooks there include: "
                f"{did_you_mean(sae.hook_out, sorted(valid_hooks))}"]
    width = hook_width(model_cfg, sae.hook_out)
    if width is not None and width != sae.d_out:
        return [f"--sae {text}: the transcoder writes d_out={sae.d_out}, but {model_name} has width {width} at "
                f"its output hook {sae.hook_out}. Is the transcoder for another model?"]
    return []


def load_sae(source: SAESource, device: str = "cpu", dtype: str = "float32") -> SAE[Any]:
    """The SAE with its weights, on ``device`` in ``dtype`` (a name such as ``"float32"``)."""
    if dtype not in DTYPE_MAP:
        raise ConfigError(f"--sae {source}: dtype {dtype!r} is not one of {', '.join(DTYPE_MAP)}.")
    if source.kind == "disk":
        sae = _load_disk(source, device, dtype)
    elif source.kind == "npz":
        sae = _load_npz(source, device, dtype)
    else:
        try:
            sae = SAE.from_pretrained(source.location, source.sae_id, device=device, dtype=dtype)
        except OSError as e:
            raise _hub_unreachable(source, e) from e
    _hook_name(source, sae.cfg)
    if sae.cfg.architecture() in REFUSED_ARCHITECTURES:
        architecture = sae.cfg.architecture()
        raise ConfigError(f"--sae {source}: {architecture} SAEs are not supported: {REFUSED_ARCHITECTURES[architecture]}.")
    if isinstance(sae, Transcoder):
        _hook_name_out(source, sae.cfg)
    return sae


def _check_pretrained(text: str, release: str, sae_id: str) -> None:
    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise ConfigError(
            f"--sae {text}: no directory {text} exists, and {release!r} is not a sae_lens pretrained "
            f"release. Releases: {did_you_mean(release, directory)}"
        )
    ids = directory[release].saes_map
    if sae_id not in ids:
        raise ConfigError(
            f"--sae {text}: release {release!r} has no SAE {sae_id!r}. Its SAE ids: {did_you_mean(sae_id, ids)}"
        )


def _npz_needs_hook(text: str, path: str) -> str:
    return (
        f"--sae {text}: an npz SAE needs the hook it reads, since params.npz does not record it. "
        f"Write PATH.npz@HOOK, e.g. {path}@blocks.12.hook_resid_post."
    )


def _hub_unreachable(source: SAESource, error: OSError) -> ConfigError:
    return hub_unreachable(f"--sae {source}", "it", error, "load it and write it with sae.save_model(DIR), then "
                           "pass --sae DIR")


def _hook_name(source: SAESource, cfg: SAEConfig) -> str:
    # SAEMetadata answers None for any name it lacks, so test for the key itself.
    hook = cfg.metadata.get("hook_name")
    if not hook:
        raise ConfigError(
            f"--sae {source}: its config names no hook (metadata.hook_name), so there is no telling "
            "which activations it encodes. Set metadata.hook_name to a TransformerLens hook name."
        )
    return hook


def _hook_name_out(source: SAESource, cfg: SAEConfig) -> str:
    hook = cfg.metadata.get("hook_name_out")
    if not hook:
        raise ConfigError(
            f"--sae {source}: it is a transcoder ({cfg.architecture()}), but its config names no output hook "
            "(metadata.hook_name_out), so there is no telling which activation it reconstructs. Set "
            "metadata.hook_name_out to a TransformerLens hook name, e.g. blocks.0.hook_mlp_out."
        )
    return hook


def _config_from_dict(source: SAESource, raw: dict[str, Any]) -> SAEConfig:
    architecture = raw.get("architecture")
    if architecture in REFUSED_ARCHITECTURES:
        raise ConfigError(f"--sae {source}: {architecture} SAEs are not supported: "
                          f"{REFUSED_ARCHITECTURES[architecture]}.")
    if architecture not in SAE_CLASS_REGISTRY:
        raise ConfigError(
            f"--sae {source}: unknown SAE architecture {architecture!r}. "
            f"sae_lens knows: {did_you_mean(str(architecture), SAE_CLASS_REGISTRY)}"
        )
    try:
        return SAEConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--sae {source}: its config is not a valid {architecture} SAE config ({e}).") from e


def _check_disk_files(source: SAESource) -> Path:
    path = Path(source.location)
    found = sorted(p.name for p in path.iterdir())
    listing = ", ".join(found) or "nothing"
    if SAE_CFG_FILENAME not in found:
        raise ConfigError(
            f"--sae {source}: an SAE directory needs {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}, "
            f"as sae_lens's SAE.save_model(DIR) writes them; found {listing}."
        )
    if SAE_WEIGHTS_FILENAME not in found:
        pickles = [name for name in found if Path(name).suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ConfigError(
                f"--sae {source}: found pickled weights ({', '.join(pickles)}) but no {SAE_WEIGHTS_FILENAME}. "
                "Pickles are refused because loading one can run arbitrary code. On a machine you trust, "
                f"convert with safetensors.torch.save_file(torch.load(FILE, weights_only=True), "
                f"'{path / SAE_WEIGHTS_FILENAME}'), keys named as the SAE's state_dict."
            )
        raise ConfigError(f"--sae {source}: no {SAE_WEIGHTS_FILENAME} in {path}; found {listing}.")
    return path


def _read_disk_config(source: SAESource) -> dict[str, Any]:
    return load_json_object(_check_disk_files(source) / SAE_CFG_FILENAME, f"--sae {source}")


def _load_disk(source: SAESource, device: str, dtype: str) -> SAE[Any]:
    def read(
        path: str | Path, on: str = "cpu", cfg_overrides: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        # sae_lens's own reader opens the weights unchecked; ours says what to do when they are broken.
        cfg = {**_read_disk_config(source), "device": on, **(cfg_overrides or {})}
        return cfg, load_safetensors(Path(path) / SAE_WEIGHTS_FILENAME, what=f"--sae {source}")

    try:
        return SAE.load_from_disk(source.location, device=device, dtype=dtype, converter=read)
    except RuntimeError as e:
        if "state_dict" not in str(e):  # only torch's load_state_dict mismatch is the user's to fix
            raise
        raise ConfigError(
            f"--sae {source}: {SAE_WEIGHTS_FILENAME} does not match the SAE that {SAE_CFG_FILENAME} describes ({e}). "
            "Write both from one SAE with sae.save_model(DIR)."
        ) from e


def _npz_shapes(source: SAESource) -> dict[str, tuple[int, ...]]:
    """Array shapes read from the ``.npy`` headers inside the archive, without reading the arrays."""
    shapes = {}
    try:
        with zipfile.ZipFile(source.location) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = NPY_HEADER_READERS.get(version)
                    if read_header is None:
                        raise ValueError(f"{info.filename} has .npy format version {version}")
                    shape, _, array_dtype = read_header(member)
                if not np.issubdtype(array_dtype, np.floating):
                    raise ValueError(f"{info.filename} holds {array_dtype}, not floats")
                shapes[info.filename.removesuffix(".npy")] = shape
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(
            f"--sae {source}: {source.location} is not a readable npz of float arrays ({e}). "
            "If it is truncated, copy or download it again."
        ) from e
    return shapes


def _npz_config(source: SAESource) -> JumpReLUSAEConfig:
    shapes = _npz_shapes(source)
    if sorted(shapes) != sorted(NPZ_ARRAYS):
        raise ConfigError(
            f"--sae {source}: a Gemma Scope params.npz holds the arrays {', '.join(NPZ_ARRAYS)}; "
            f"found {', '.join(sorted(shapes)) or 'none'}."
        )
    d_in, d_sae = shapes["W_enc"] if len(shapes["W_enc"]) == 2 else (-1, -1)
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
                "threshold": (d_sae,)}
    if d_in < 1 or shapes != expected:
        found = ", ".join(f"{name} {list(shapes[name])}" for name in NPZ_ARRAYS)
        raise ConfigError(
            f"--sae {source}: array shapes do not fit a JumpReLU SAE, which needs W_enc [d_in, d_sae], "
            f"W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], threshold [d_sae]; found {found}."
        )
    assert source.hook is not None  # parse gives every npz source a hook
    return JumpReLUSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        # Gemma Scope encodes the raw activation: b_dec is only added back when decoding.
        apply_b_dec_to_input=False,
        # As sae_lens does for Gemma Scope's attention SAEs: hook_z is [..., n_heads, d_head], flattened to d_in.
        reshape_activations="hook_z" if source.hook.endswith("hook_z") else "none",
        metadata=SAEMetadata(hook_name=source.hook, prepend_bos=True),
    )


def _load_npz(source: SAESource, device: str, dtype: str) -> JumpReLUSAE:
    cfg = _npz_config(source)
    try:
        with np.load(source.location, allow_pickle=False) as arrays:
            state = {name: torch.from_numpy(arrays[name]) for name in NPZ_ARRAYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(
            f"--sae {source}: could not read the arrays of {source.location} ({e}). "
            "If it is truncated, copy or download it again."
        ) from e
    # Built on the meta device and then given the loaded tensors, so the weights exist once in memory.
    cfg.device = "meta"
    sae = JumpReLUSAE(cfg)
    sae.load_state_dict(state, assign=True)
    return sae.to(device=device, dtype=DTYPE_MAP[dtype])


# -- what a loaded SAE reads and writes ------------------------------------------------------------


# sae_lens's run-time activation normalizations that keep each call's scale on the SAE itself
# (x_norm_coeff; ln_mu and ln_std), set in encode and read after it
STATEFUL_NORMALIZATIONS = ("constant_norm_rescale", "layer_norm")


def encode_keeps_state(sae: SAE[Any]) -> bool:
    """Whether ``sae.encode`` keeps per-call state on the SAE, so that two calls at once would mix it."""
    return getattr(sae.cfg, "normalize_activations", None) in STATEFUL_NORMALIZATIONS


def is_transcoder(sae: SAE[Any]) -> bool:
    """Whether ``sae`` reconstructs another hook than the one it reads."""
    return isinstance(sae, Transcoder)


def input_hook(sae: SAE[Any]) -> str | None:
    """The hook whose activations the SAE encodes."""
    return sae.cfg.metadata.get("hook_name")


def output_hook(sae: SAE[Any]) -> str | None:
    """The hook whose activation the SAE's reconstruction replaces when spliced in: a transcoder's
    ``hook_name_out``, else the hook it reads (as sae_lens's ``HookedSAETransformer.add_sae``)."""
    return sae.cfg.metadata.get("hook_name_out") or input_hook(sae)


def model_hook_problems(sae: SAE[Any], hook_dict: dict) -> list[str]:
    """What is wrong with the SAE's hooks on a model with these hooks: each one it lacks."""
    problems = []
    if sae.cfg.architecture() in REFUSED_ARCHITECTURES:
        architecture = sae.cfg.architecture()
        problems.append(f"{architecture} SAEs are not supported: {REFUSED_ARCHITECTURES[architecture]}.")
    hooks = [("reads", input_hook(sae))]
    if is_transcoder(sae):
        hooks.append(("writes (metadata.hook_name_out)", sae.cfg.metadata.get("hook_name_out")))
    for role, hook in hooks:
        if hook not in hook_dict:
            kind = "transcoder" if is_transcoder(sae) else "SAE"
            problems.append(f"the {kind} {role} hook {hook!r}, which this model does not have. "
                            f"Its hooks include: {did_you_mean(str(hook), list(hook_dict))}")
    return problems


def transcoder_output(tc: Transcoder, x: torch.Tensor, feature_acts: torch.Tensor) -> torch.Tensor:
    """What the transcoder writes for input ``x`` and latents ``feature_acts``: ``decode`` plus, for
    skip transcoders, the skip path ``x @ W_skip.T`` (as sae_lens's ``SkipTranscoder.forward``)."""
    out = tc.decode(feature_acts)
    if hasattr(tc, "W_skip"):
        out = out + x @ tc.W_skip.T.to(x.device)
    return out


def decoder_scale(sae: SAE[Any], sae_in: torch.Tensor) -> torch.Tensor | None:
    """The per-token factor by which the SAE's ``decode`` multiplies ``feature_acts @ W_dec`` when it
    normalises activations at run time, ``[..., 1]``; None when there is none (the decoder is linear).

    ``sae_in`` is the SAE's input as its ``hook_sae_input`` sees it (cast and reshaped, not yet
    normalised). sae_lens's ``layer_norm`` decodes ``y * std + mean`` with the input's std along the
    last dimension; ``constant_norm_rescale`` decodes ``y / c`` with ``c = sqrt(d_in) / |x|``.
    Transcoders never undo their input's normalisation (sae_lens's ``Transcoder.decode``)."""
    normalization = sae.cfg.normalize_activations
    if is_transcoder(sae) or normalization not in RUN_TIME_NORMALIZATIONS:
        return None
    if normalization == "layer_norm":
        return (sae_in - sae_in.mean(dim=-1, keepdim=True)).std(dim=-1, keepdim=True)
    return 1 / ((sae.cfg.d_in**0.5) / sae_in.norm(dim=-1, keepdim=True))


class TranscoderSplice:
    """A transcoder spliced in with plain TransformerLens hooks: the output hook's activation is
    replaced by what the transcoder writes from the input hook's activation (its reconstruction,
    plus the skip path), plus, with ``use_error_term``, the error ``original output - transcoder(input)``
    computed from the unedited latents, so that edits of the latents still show.

    ``edit`` (optional) changes the latents ``[batch, pos, d_sae]`` before they are decoded. After a
    forward, ``acts`` holds the latents (unedited) and ``output`` what the output hook passed on.
    """

    def __init__(self, tc: Transcoder, use_error_term: bool = False, edit=None):
        self.tc, self.use_error_term, self.edit = tc, use_error_term, edit
        self.acts: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._input: torch.Tensor | None = None

    @property
    def hooks(self) -> list[tuple[str, Any]]:
        """``fwd_hooks`` for ``run_with_hooks`` or ``model.hooks``."""
        return [(input_hook(self.tc), self._capture), (output_hook(self.tc), self._replace)]

    def _capture(self, activation: torch.Tensor, hook) -> None:
        self._input = activation

    def _replace(self, original: torch.Tensor, hook) -> torch.Tensor:
        if self._input is None:
            raise ConfigError(f"the transcoder's output hook {output_hook(self.tc)} ran before its input hook "
                              f"{input_hook(self.tc)}: a transcoder must read a hook that comes first.")
        x, self._input = self._input, None
        acts = self.tc.encode(x)
        edited = acts if self.edit is None else self.edit(acts.clone())
        out = transcoder_output(self.tc, x, edited)
        if self.use_error_term:
            with torch.no_grad():
                error = original - transcoder_output(self.tc, x, acts)
            out = out + error
        self.acts, self.output = acts, out
        return out.to(original.dtype)
