"""Typed prompts through a store's model and SAE, encoded as the extraction encodes a dataset row.

``PromptEncoder`` loads the model and one SAE named in a store's run record, once. Called with
text, it tokenizes the text as the workers tokenize a row, starts the window with BOS when the
run did, and encodes it with the workers' ``SparseEncoder`` in the run's model and value dtypes,
so a prompt's activations are the ones the store would hold for that text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.dataset import make_windows, tokenize_rows
from pipeline.encode import SparseEncoder, concat_batches
from pipeline.models import load_model, weights_hash
from pipeline.saes import SAESource, load_sae
from pipeline.worker import pick_device
from store.errors import ConfigError, DataError, did_you_mean
from store.format import decode_values, index_dtype, sae_name, storage_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptFeatures:
    """One prompt's tokens and its SAE activations at each, as a CSR over the tokens."""

    token_ids: np.ndarray  # int64 [n_tokens], the added BOS first when the run added one
    positions: np.ndarray  # int32 [n_tokens]: position in the text's tokenization (-1: the added BOS)
    indptr: np.ndarray  # int64 [n_tokens + 1]
    indices: np.ndarray  # features, ascending within a token
    values: np.ndarray  # float32, rounded to the run's value dtype as the store rounds them

    def top(self, k: int) -> list[list[tuple[int, float]]]:
        """The k strongest features above 0 at each token, ties to the lower feature
        (``FeatureStore.prompt_features``'s order)."""
        out = []
        for a, b in zip(self.indptr[:-1], self.indptr[1:]):
            features, values = self.indices[a:b], self.values[a:b]
            keep = values > 0
            features, values = features[keep], values[keep]
            order = np.lexsort((features, -values.astype(np.float64)))[:k]
            out.append([(int(features[j]), float(values[j])) for j in order])
        return out


class PromptEncoder:
    """Maps text to ``PromptFeatures`` of the SAE named ``sae``, with the model and that SAE of the
    run ``run`` (a store's ``fs.run``), loaded once here. ``FeatureStore.resolve`` gives the name of
    an SAE known by its hook."""

    def __init__(self, run: dict, sae: str, device: str | None = None):
        records = {sae_name(record): record for record in run["saes"]}
        if sae not in records:
            raise ConfigError(f"the run has no SAE named {sae!r}; its SAEs: {did_you_mean(sae, records)}")
        record = records[sae]
        self.name, self.hook = sae, record["hook"]
        self.model_name = run["model"]["name"]
        self.value_dtype = run["value_dtype"]
        self.context_size = int(run["context_size"])
        self.device = pick_device(device)
        self.model = load_model(run["model"]["name"], self.device, run["model"].get("dtype"))
        model_dtype = str(self.model.cfg.dtype).removeprefix("torch.")
        loaded = load_sae(SAESource.parse(record["source"]), device=str(self.device), dtype=model_dtype)
        self.d_sae = loaded.cfg.d_sae
        _warn_if_changed(run["model"].get("weights_hash"), self.model, f"the model {run['model']['name']}")
        _warn_if_changed(record.get("weights_hash"), loaded, f"the SAE {record['source']}")
        self.tokenizer = self.model.tokenizer
        if self.tokenizer is None:
            raise ConfigError(f"the run's model {run['model']['name']} has no tokenizer, so typed text cannot "
                              "be tokenized. Serve a model directory that holds its tokenizer files.")
        self.bos_id = self.tokenizer.bos_token_id if run["prepend_bos"] else None
        self.encoder = SparseEncoder(self.model, {sae: loaded}, self.value_dtype)

    @property
    def max_text_tokens(self) -> int:
        """The longest text, in tokens, that fits one of the run's windows."""
        return self.context_size - (self.bos_id is not None)

    def __call__(self, text: str) -> PromptFeatures:
        ids = tokenize_rows([text], [0], self.tokenizer, False, self.model.cfg.d_vocab)[0]
        if len(ids) > self.max_text_tokens:
            bos = ", one of them the BOS it starts with" if self.bos_id is not None else ""
            raise DataError(
                f"the prompt is {len(ids)} tokens long; this run's windows hold {self.context_size} tokens"
                f"{bos}, so at most {self.max_text_tokens} tokens of text. Shorten the prompt."
            )
        windows = make_windows([ids], [0], self.context_size, self.bos_id)
        if windows.n_tokens == 0:
            raise DataError("the prompt makes no tokens: type some text.")
        tokens = torch.from_numpy(windows.tokens).to(self.device)
        batch = self.encoder(tokens, torch.from_numpy(windows.lengths).to(self.device))[self.name]
        indptr, indices, values = concat_batches([batch], index_dtype(self.d_sae), storage_dtype(self.value_dtype),
                                                 windows.n_tokens)
        return PromptFeatures(windows.flat_tokens(), windows.positions, indptr, indices,
                              decode_values(values, self.value_dtype))


def _warn_if_changed(recorded: str | None, module: torch.nn.Module, what: str) -> None:
    """Weights changed since the extraction give numbers the store does not hold: say so once."""
    if recorded is not None and weights_hash(module) != recorded:
        log.warning("%s is not the one the store was extracted with (its weights hash differs): typed "
                    "prompts' activations will not match the store's.", what)
