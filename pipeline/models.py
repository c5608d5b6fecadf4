"""Loading TransformerLens models: hub names, latentstore's local model format, and Hugging Face
model directories through TransformerLens's ``TransformerBridge``.

A local model is a directory holding ``config.json`` and ``model.safetensors``, in one of two
formats, told apart by the config (``model_format``):

- **latentstore's format** (``save_model`` writes it), loaded as a ``HookedSAETransformer``:
  ``config.json`` holds the fields of a ``HookedTransformerConfig`` (torch dtypes as strings
  such as ``"float32"``), ``model.safetensors`` the model's ``state_dict()``, and optional
  tokenizer files load with ``transformers.AutoTokenizer.from_pretrained(dir)``.
- **Hugging Face's format** (``save_pretrained`` writes it; its ``config.json`` names a
  ``model_type`` or ``architectures``), loaded as sae_lens's ``SAETransformerBridge`` with
  Hugging Face's own numerics (no weight processing). Its tokenizer files must sit beside it.

Weights only ever load from safetensors. Model loading lives in this one module so that the
move from ``HookedTransformer`` to ``TransformerBridge`` is one change when it comes; so do
the few places where the two differ for the rest of the pipeline (``can_start_at_layer``,
``forward_attention_mask``).

Hook names: callers speak TransformerLens's names (``blocks.8.hook_resid_pre``), as SAEs record
them, on either kind of model (``bridge_class`` makes the bridge take them). A bridge's own
name for that hook is ``blocks.8.hook_in``; ``hook_point`` gives it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from store.errors import ConfigError, did_you_mean

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARDED_WEIGHTS_INDEX = "model.safetensors.index.json"  # save_pretrained's index of sharded weights
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
HF_CONFIG_KEYS = ("model_type", "architectures")  # what tells a Hugging Face config from ours
HF_ONLY_FILES = ("generation_config.json", SHARDED_WEIGHTS_INDEX)  # save_pretrained writes them, save_model never

HOOKED = "HookedTransformer"
BRIDGE = "TransformerBridge"


def is_local_model(spec: str) -> bool:
    return Path(spec).is_dir()


def model_format(spec: str) -> str:
    """How ``spec`` loads: ``BRIDGE`` for a Hugging Face model directory, else ``HOOKED`` (a hub
    name or latentstore's format). A directory whose config.json is missing or unreadable is
    refused here, before any work, with what to do."""
    if not is_local_model(spec):
        return HOOKED
    return BRIDGE if any(key in _read_local_config(Path(spec), spec) for key in HF_CONFIG_KEYS) else HOOKED


def loader_name(model: Any) -> str:
    """``BRIDGE`` or ``HOOKED``: what loaded ``model``, as the store records it."""
    return BRIDGE if is_bridge_model(model) else HOOKED


def is_bridge_model(model: Any) -> bool:
    """Whether a loaded model is a ``TransformerBridge`` (else a ``HookedTransformer``)."""
    from transformer_lens.model_bridge import TransformerBridge

    return isinstance(model, TransformerBridge)


def _read_local_config(path: Path, spec: str) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        if _looks_like_hugging_face(path):
            raise ConfigError(
                f"--model {spec}: this looks like a Hugging Face model directory (for TransformerBridge), "
                f"but it has no {CONFIG_FILE}, which says the architecture and sizes; found {found}. "
                f"Save the model with model.save_pretrained(dir), which writes {CONFIG_FILE} beside "
                f"{WEIGHTS_FILE}, or copy {CONFIG_FILE} from where the weights came from "
                "(transformers.AutoConfig.from_pretrained(NAME).save_pretrained(dir))."
            )
        raise ConfigError(
            f"--model {spec}: a local model directory needs {CONFIG_FILE} and {WEIGHTS_FILE}; found {found}. "
            f"Write one with pipeline.models.save_model(model, dir) (a HookedTransformer), or with "
            "model.save_pretrained(dir) and tokenizer.save_pretrained(dir) (a Hugging Face model, "
            "loaded through TransformerBridge)."
        )
    return load_json_object(config_path, f"--model {spec}")


def _looks_like_hugging_face(path: Path) -> bool:
    """Files that only ``save_pretrained`` writes, or weights named as torch modules name them
    (``transformer.h.0.attn.c_attn.weight``), where a HookedTransformer's are ``blocks.0.attn.W_Q``."""
    if any((path / name).is_file() for name in HF_ONLY_FILES):
        return True
    if not (path / WEIGHTS_FILE).is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:  # reads the header only
            names = list(f.keys())
    except Exception:  # unreadable weights are reported when loading them
        return False
    return any(name.endswith((".weight", ".bias")) for name in names)


def save_model(model: Any, path: str | Path, tokenizer: Any | None = None) -> Path:
    """Write ``model`` (a ``HookedTransformer``) in latentstore's local model format."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = _config_to_json(model.cfg)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def _config_to_json(cfg: Any) -> dict[str, Any]:
    out = {}
    for key, value in cfg.to_dict().items():
        if key == "device":  # where to run is the loader's choice, not the model's
            continue
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        out[key] = value
    return out


def load_model_config(spec: str) -> Any:
    """The model's config without loading its weights: a ``HookedTransformerConfig``, or for a
    Hugging Face directory the ``TransformerBridgeConfig`` of a bridge built without weights
    (its ``model_name`` is the directory)."""
    from transformer_lens import HookedTransformerConfig

    if model_format(spec) == BRIDGE:
        return _weightless_bridge(spec).cfg
    if is_local_model(spec):
        raw = _read_local_config(Path(spec), spec)
        if isinstance(raw.get("dtype"), str):
            raw["dtype"] = getattr(torch, raw["dtype"])
        try:
            return HookedTransformerConfig.from_dict(raw)
        except TypeError as e:
            raise ConfigError(
                f"--model {spec}: {CONFIG_FILE} does not hold HookedTransformerConfig fields ({e}). "
                f"A Hugging Face config names its {' or '.join(HF_CONFIG_KEYS)}, and then loads through "
                "TransformerBridge."
            ) from e
    from transformer_lens import loading

    try:
        return loading.get_pretrained_model_config(spec)
    except OSError as e:  # huggingface_hub's network and cache errors (some are ValueErrors too)
        raise hub_unreachable(f"--model {spec!r}", "its config", e,
                              "write it with pipeline.models.save_model(model, DIR) and pass --model DIR") from e
    except ValueError as e:
        raise _unknown_model(spec) from e


def _unknown_model(spec: str) -> ConfigError:
    from transformer_lens import loading

    return ConfigError(
        f"--model {spec!r} is neither a local model directory nor a TransformerLens model name. "
        f"Pass a directory written by pipeline.models.save_model or by save_pretrained, or one of: "
        f"{did_you_mean(spec, loading.OFFICIAL_MODEL_NAMES)}"
    )


def _weightless_bridge(spec: str) -> Any:
    """A ``TransformerBridge`` of the directory's config without its weights: its config and hook
    names, for validation. Built on the meta device (no memory) where the architecture allows;
    a fused QKV projection (GPT-2, GPT-NeoX) is split at boot, which needs values, so those get
    random bfloat16 weights on the CPU (half the bytes of float32; read, never run)."""
    from transformer_lens.model_bridge import TransformerBridge

    path = Path(spec)
    own = _own_dtype(_read_local_config(path, spec))
    tokenizer = _bridge_tokenizer(path, spec)

    def boot(dtype: torch.dtype):
        bridge = TransformerBridge.boot_transformers(str(path), load_weights=False, device="cpu", dtype=dtype,
                                                     tokenizer=tokenizer)
        bridge.cfg.dtype = getattr(torch, own)  # the config says what the model is, not how it was built here
        return bridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                with torch.device("meta"):
                    return boot(getattr(torch, own))
            except NotImplementedError:  # "cannot split a fused QKV projection ... on the meta device"
                return boot(torch.bfloat16)
        except (ValueError, KeyError, OSError, NotImplementedError) as e:
            raise ConfigError(
                f"--model {spec}: TransformerBridge cannot build this Hugging Face model ({e}). "
                "transformer_lens.model_bridge.supported_architectures lists the architectures it knows."
            ) from e


def hub_unreachable(flag: str, what: str, error: OSError, save_hint: str) -> ConfigError:
    """The error for a model or an SAE that the Hugging Face hub did not give (``error``, from
    huggingface_hub), with how to do without the hub here."""
    said = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ConfigError(f"{flag}: could not fetch {what} from the Hugging Face hub ({said}). Check the connection "
                       f"(and HF_TOKEN for gated repositories); or, where the hub is reachable, {save_hint}.")


def load_model(spec: str, device: str | torch.device = "cpu", dtype: str | None = None) -> Any:
    """A ``HookedSAETransformer`` from a hub name or a directory in latentstore's format, or an
    ``SAETransformerBridge`` from a Hugging Face model directory."""
    from sae_lens import HookedSAETransformer

    if model_format(spec) == BRIDGE:
        return _load_bridge(spec, device, dtype)
    if not is_local_model(spec):
        from transformer_lens import loading

        try:
            loading.get_official_model_name(spec)
        except ValueError as e:  # its message lists every name TransformerLens knows, after a traceback
            raise _unknown_model(spec) from e
        kwargs = {"dtype": dtype} if dtype else {}
        return HookedSAETransformer.from_pretrained(spec, device=str(device), **kwargs)

    cfg = load_model_config(spec)
    cfg.device = str(device)
    if dtype:
        cfg.dtype = getattr(torch, dtype)
    path = Path(spec)
    state = load_safetensors(path / WEIGHTS_FILE, what=f"--model {spec}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedSAETransformer(cfg, move_to_device=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Buffers such as attention masks are rebuilt by the constructor.
    missing = [k for k in missing if not k.endswith((".IGNORE", ".mask"))]
    if missing or unexpected:
        raise ConfigError(
            f"--model {spec}: {WEIGHTS_FILE} does not match {CONFIG_FILE}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    model.to(cfg.dtype, print_details=False)
    model.to(str(device), print_details=False)
    tokenizer = load_local_tokenizer(path)
    if tokenizer is not None:
        model.set_tokenizer(tokenizer)
    return model.eval()


def _load_bridge(spec: str, device: str | torch.device, dtype: str | None) -> Any:
    """sae_lens's ``SAETransformerBridge`` (as ``bridge_class()``) over the directory's Hugging Face
    model, in the config's dtype unless ``dtype`` says otherwise, weights from safetensors only."""
    path = Path(spec)
    raw = _read_local_config(path, spec)
    if not (path / WEIGHTS_FILE).is_file() and not (path / SHARDED_WEIGHTS_INDEX).is_file():
        load_safetensors(path / WEIGHTS_FILE, what=f"--model {spec}")  # raises, naming any pickles found
    tokenizer = _bridge_tokenizer(path, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bridge_class().boot_transformers(str(path), device=str(device),
                                                       dtype=getattr(torch, dtype or _own_dtype(raw)),
                                                       tokenizer=tokenizer)
    return model.eval()


@functools.cache
def bridge_class() -> type:
    """sae_lens's ``SAETransformerBridge``, answering to TransformerLens's hook names as well.

    ``TransformerBridge.hook_dict`` lists TransformerLens's names (``blocks.8.hook_resid_pre``)
    beside the bridge's own (``blocks.8.hook_in``), so hooks, ``names_filter`` and caches take
    either. ``SAETransformerBridge`` overrides ``hook_dict`` to add its SAEs' internal hooks and
    drops those names: a hook or filter given by one then matches nothing, silently. This
    puts them back, for the SAEs' internal hooks too (``blocks.8.hook_resid_pre.hook_sae_acts_post``),
    so code written for ``HookedSAETransformer`` runs on the bridge unchanged. Caches hold a
    tensor under each name asked for.

    It also names each hook point by its full name again: removing an SAE puts a fresh
    ``HookPoint`` back that is named ``hook_in`` rather than ``blocks.8.hook_in``, after which
    ``run_with_hooks`` at that hook silently adds nothing (seen with sae_lens 6.54).
    """
    from sae_lens import SAETransformerBridge
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge import TransformerBridge

    class LatentstoreBridge(SAETransformerBridge):
        @property
        def hook_dict(self) -> dict[str, HookPoint]:
            hooks = super().hook_dict  # the bridge's own names, and attached SAEs' internal hooks
            for name, point in hooks.items():
                point.name = name  # a point sae_lens put back on removing an SAE is named by its last part only
            for name, point in TransformerBridge.hook_dict.fget(self).items():  # own names + aliases
                if isinstance(point, HookPoint):
                    hooks.setdefault(name, point)
                elif isinstance(point, torch.nn.Module):  # sae_lens's wrapper of an SAE attached there
                    for internal, internal_point in point.named_modules():
                        if internal and isinstance(internal_point, HookPoint):
                            hooks.setdefault(f"{name}.{internal}", internal_point)
            return hooks

    LatentstoreBridge.__qualname__ = LatentstoreBridge.__name__
    return LatentstoreBridge


def _own_dtype(raw: dict[str, Any]) -> str:
    """The dtype a Hugging Face config gives its weights (transformers 5 writes ``dtype``, 4
    ``torch_dtype``); float32 where it says none."""
    own = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return own if isinstance(own, str) and isinstance(getattr(torch, own, None), torch.dtype) else "float32"


def _bridge_tokenizer(path: Path, spec: str) -> Any:
    tokenizer = load_local_tokenizer(path)
    if tokenizer is None:
        raise ConfigError(
            f"--model {spec}: a Hugging Face model directory needs its tokenizer beside it "
            "(tokenizer.json or tokenizer_config.json); save it with tokenizer.save_pretrained(dir)."
        )
    return tokenizer


def load_local_tokenizer(path: Path) -> Any | None:
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_tokenizer(spec: str) -> Any | None:
    """The model's tokenizer alone (the workers tokenize; they need no weights for it)."""
    if is_local_model(spec):
        return load_local_tokenizer(Path(spec))
    from transformers import AutoTokenizer

    cfg = load_model_config(spec)
    return AutoTokenizer.from_pretrained(cfg.tokenizer_name) if cfg.tokenizer_name else None


def load_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file of fields (a model's or an SAE's config), refused with ``what`` named when it is
    not valid JSON or holds anything but an object."""
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what}: {path} is not valid JSON ({e}).") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: {path} holds a {type(raw).__name__}, not a JSON object of fields.")
    return raw


def load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, with errors that say what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        pickles = [p.name for p in path.parent.glob("*") if p.suffix in PICKLE_SUFFIXES]
        hint = (
            f" Found {', '.join(pickles)}: pickled weights are refused because loading them can run "
            "arbitrary code. Convert them with safetensors.torch.save_file(torch.load(f), ...) "
            "on a machine you trust."
            if pickles
            else ""
        )
        raise ConfigError(f"{what}: no {path.name} in {path.parent}.{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(
            f"{what}: {path} is not a readable safetensors file ({e}). "
            "It may be truncated: copy or download it again."
        ) from e


def hook_names(cfg: Any) -> list[str]:
    """Every hook point of a model with this config, found without allocating weights. For a
    ``TransformerBridgeConfig``, both TransformerLens's names and the bridge's own."""
    from transformer_lens import HookedTransformer
    from transformer_lens.config import TransformerBridgeConfig

    if isinstance(cfg, TransformerBridgeConfig):
        return list(_weightless_bridge(cfg.model_name).hook_dict)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, move_to_device=False)
    return list(model.hook_dict)


def hook_width(cfg: Any, hook: str) -> int | None:
    """The width an SAE at ``hook`` must have as ``d_in``, or None when it cannot be told from the config."""
    last = hook.rsplit(".", 1)[-1]
    if last in {"hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                "hook_embed", "hook_pos_embed", "hook_normalized"}:
        return cfg.d_model
    if last in {"hook_pre", "hook_post", "hook_pre_linear"} and ".mlp." in hook:
        return cfg.d_mlp
    if last == "hook_z":  # sae_lens flattens heads for hook_z SAEs
        return cfg.n_heads * cfg.d_head
    return None


def hook_layer(hook: str) -> int | None:
    """The block index a hook lives in, or None for hooks after the last block."""
    parts = hook.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    if parts[0] in {"hook_embed", "hook_pos_embed", "hook_tokens"}:
        return -1
    return None


def stop_layer(hooks: list[str]) -> int | None:
    """``stop_at_layer`` for a forward that reaches every hook in ``hooks`` and no further."""
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    return max(layers) + 1


# -- where HookedTransformer and TransformerBridge differ, for the rest of the pipeline ---------


def hook_point(model: Any, hook: str) -> str:
    """The loaded model's own name for TransformerLens hook ``hook``: ``hook`` itself on a
    HookedTransformer; on a bridge, e.g. ``blocks.8.hook_in`` for ``blocks.8.hook_resid_pre``
    (what the store records beside the hook). A name the model lacks comes back as it is."""
    name = getattr(model.hook_dict.get(hook), "name", None)
    return name if isinstance(name, str) else hook


def hook_module(model: Any, hook: str) -> Any:
    """The HookPoint that a forward passes TransformerLens hook ``hook``'s activations through, reached
    by the model's own name, as ``run_with_hooks`` reaches it: on a bridge, the point under the
    TransformerLens alias may be a stale one that sae_lens left after splicing an SAE in and out."""
    return model.hook_dict[hook_point(model, hook)]


def can_start_at_layer(model: Any) -> bool:
    """Whether a forward can start inside the model (``start_at_layer``): a HookedTransformer can;
    a TransformerBridge runs Hugging Face's forward, which always starts from the tokens."""
    return not is_bridge_model(model)


def forward_attention_mask(model: Any, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
    """The attention mask a forward over ``tokens`` uses, to pass to later forwards over the same
    rows: a HookedTransformer computes it from the tokens where none is given; a bridge takes the
    mask as given (it derives positions from it itself)."""
    if is_bridge_model(model):
        return attention_mask
    return model.input_to_embed(tokens, attention_mask=attention_mask)[3]


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes), independent of device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()
