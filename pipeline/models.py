"""Loading TransformerLens models: hub names, and latentstore's local model format.

A local model is a directory holding

- ``config.json``: the fields of a ``HookedTransformerConfig`` (torch dtypes as
  strings such as ``"float32"``),
- ``model.safetensors``: the model's ``state_dict()``,
- optionally tokenizer files that ``transformers.AutoTokenizer.from_pretrained(dir)``
  loads.

``save_model`` writes that format. Weights only ever load from safetensors.
Model loading lives in this one module so that the move from ``HookedTransformer``
to TransformerLens's ``TransformerBridge`` is one change when it comes.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from store.errors import ConfigError, did_you_mean

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def is_local_model(spec: str) -> bool:
    return Path(spec).is_dir()


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
    """The ``HookedTransformerConfig`` of a model, without loading its weights."""
    from transformer_lens import HookedTransformerConfig

    if is_local_model(spec):
        path = Path(spec)
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise ConfigError(
                f"--model {spec}: a local model directory needs {CONFIG_FILE} and {WEIGHTS_FILE}; "
                f"found {found}. Write one with pipeline.models.save_model(model, dir)."
            )
        try:
            raw = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"--model {spec}: {CONFIG_FILE} is not valid JSON ({e}).") from e
        if isinstance(raw.get("dtype"), str):
            raw["dtype"] = getattr(torch, raw["dtype"])
        try:
            return HookedTransformerConfig.from_dict(raw)
        except TypeError as e:
            raise ConfigError(
                f"--model {spec}: {CONFIG_FILE} does not hold HookedTransformerConfig fields ({e})."
            ) from e
    from transformer_lens import loading

    try:
        return loading.get_pretrained_model_config(spec)
    except ValueError as e:
        raise ConfigError(
            f"--model {spec!r} is neither a local model directory nor a TransformerLens model name. "
            f"Pass a directory written by pipeline.models.save_model, or one of: "
            f"{did_you_mean(spec, loading.OFFICIAL_MODEL_NAMES)}"
        ) from e


def load_model(spec: str, device: str | torch.device = "cpu", dtype: str | None = None) -> Any:
    """A ``HookedSAETransformer`` from a hub name or a local model directory."""
    from sae_lens import HookedSAETransformer

    if not is_local_model(spec):
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
    """Every hook point of a model with this config, found without allocating weights."""
    from transformer_lens import HookedTransformer

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


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes), independent of device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()
