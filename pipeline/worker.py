"""The extraction worker: a plain class (no Ray import) that turns shards into store parts.

``__init__`` loads the model, the SAEs, the tokenizer and the dataset once;
``run_shard`` tokenizes one shard's rows, encodes them in batches and writes the
shard straight to the store, returning only its small completion marker. Ray
wraps this class as an actor in ``jobs/extract.py``; tests call it directly.

Two shards can be under way at once (``SHARDS_IN_FLIGHT``, from two threads): one on the
device, the other being read and tokenized before it, or its host side (statistics,
compression, writes) running on the worker's thread pool after it, so the device does not wait
for the host to start or to finish a shard (save for the host's share of the interpreter lock).

On a CPU, a shard's batches are encoded by one stream per core (``encode_streams``), each on one
torch thread, in order of submission; its host side takes its turns on the cores beside them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.dataset import DatasetSpec, Shard, make_windows, open_dataset, rows_digest, tokenize_rows
from pipeline.encode import SparseBatch, SparseEncoder, encode_streams
from pipeline.shard_builder import ShardBuilder, pool_size
from pipeline.models import hook_point, load_model, loader_name, weights_hash
from pipeline.saes import SAESource, input_hook, is_transcoder, load_sae, model_hook_problems, output_hook
from pipeline.specs import ExtractConfig
from store import index as index_mod
from store.errors import ConfigError, DataError
from store.writer import ShardData, StoreWriter

log = logging.getLogger(__name__)

SHARDS_IN_FLIGHT = 2  # calls of run_shard a worker takes at once: one encoding, one finishing


@dataclass(frozen=True)
class ExtractJob:
    """What every worker needs: the config, validated by the driver, and what it resolved."""

    config: ExtractConfig  # its store path normalized
    prepend_bos: bool  # the config's, or else what the SAEs were trained with
    device: str | None = None  # None: the GPU Ray gave this worker, else the CPU
    n_threads: int | None = None  # a CPU worker's cores: one encoding stream each (None: torch's own threads)

    # The settings the worker reads, by their short names.
    @property
    def model(self) -> str:
        return self.config.model.name

    @property
    def model_dtype(self) -> str | None:
        return self.config.model.dtype

    @property
    def saes(self) -> tuple[str, ...]:
        return tuple(self.config.saes)

    @property
    def dataset(self) -> DatasetSpec:
        return self.config.dataset

    @property
    def context_size(self) -> int:
        return self.config.dataset.context_size

    @property
    def store(self) -> str:
        return self.config.store.path

    @property
    def value_dtype(self) -> str:
        return self.config.store.value_dtype

    @property
    def top_k(self) -> int:
        return self.config.store.top_k

    @property
    def batch_size(self) -> int:  # windows per forward
        return self.config.resources.batch_size


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ExtractWorker:
    def __init__(self, job: ExtractJob):
        import numcodecs

        # Blosc without threads of its own: zarr compresses chunks on its threads and the host pool writes
        # arrays at once; Blosc's threads on top gained 3 to 14% on writes alone (measured, 2 cores) and
        # would take cores from the forward.
        numcodecs.blosc.use_threads = False
        self.job = job
        self.device = pick_device(job.device)
        self.model = load_model(job.model, self.device, job.model_dtype)
        self.saes = {}  # by name: what the store keys each SAE's data by
        for text in job.saes:
            source = SAESource.parse(text)
            sae = load_sae(source, device=str(self.device), dtype=str(self.model.cfg.dtype).removeprefix("torch."))
            self.saes[source.name or input_hook(sae)] = sae
        self._check_hooks()
        self.encoder = SparseEncoder(self.model, self.saes, job.value_dtype)
        self.n_streams = encode_streams(self.model, self.device, job.n_threads)
        if self.device.type == "cpu" and job.n_threads:
            torch.set_num_threads(1 if self.n_streams > 1 else job.n_threads)
        self.streams = ThreadPoolExecutor(self.n_streams, thread_name_prefix="encode") if self.n_streams > 1 else None
        self.host = ThreadPoolExecutor(pool_size(job.n_threads), thread_name_prefix="host")
        self.device_lock = threading.Lock()  # one shard on the device (or queueing its batches) at a time
        self.tokenizer_lock = threading.Lock()  # and one being read and tokenized
        self.dataset = open_dataset(job.dataset)
        self.writer = StoreWriter(job.store)
        tokenizer = self.model.tokenizer
        self.bos_id = tokenizer.bos_token_id if (job.prepend_bos and tokenizer is not None) else None
        if job.prepend_bos and self.bos_id is None:
            raise ConfigError("BOS is on but the model's tokenizer has no BOS token; pass --no-prepend-bos.")

    def _check_hooks(self) -> None:
        """The SAEs' hooks (and transcoders' output hooks) exist and carry activations of their width
        (one real, tiny forward)."""
        problems = [p for sae in self.saes.values() for p in model_hook_problems(sae, self.model.hook_dict)]
        if problems:
            raise ConfigError(problems)
        widths = {input_hook(sae): ("d_in", sae.cfg.d_in) for sae in self.saes.values()}
        widths.update({output_hook(sae): ("d_out", sae.cfg.d_out) for sae in self.saes.values() if is_transcoder(sae)})
        with torch.inference_mode():
            _, cache = self.model.run_with_cache(
                torch.zeros((1, 1), dtype=torch.long, device=self.device), names_filter=list(widths)
            )
        for hook, (name, expected) in widths.items():
            width = int(np.prod(cache[hook].shape[2:]))
            if width != expected:
                raise ConfigError(
                    f"the SAE at {hook} has {name}={expected}, but the model's activations there have "
                    f"width {width}. Is the SAE for another model?"
                )

    def describe(self) -> dict:
        """Hashes and facts that only the loaded weights can tell, for the store's metadata."""
        tokenizer = self.model.tokenizer
        return {
            "model_weights_hash": weights_hash(self.model),
            "model_loader": loader_name(self.model),
            "sae_weights_hashes": {name: weights_hash(sae) for name, sae in self.saes.items()},
            # the model's own names of the hooks
            "hook_points": {name: hook_point(self.model, input_hook(sae)) for name, sae in self.saes.items()},
            "tokenizer": None
            if tokenizer is None
            else {
                "name": getattr(tokenizer, "name_or_path", None),
                "class": type(tokenizer).__name__,
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            "device": str(self.device),
            "vocab": None if tokenizer is None else tokenizer.batch_decode([[i] for i in range(self.model.cfg.d_vocab)]),
        }

    def run_shard(self, shard: Shard) -> dict:
        """Encode and write one shard; returns its completion marker. Safe to call again."""
        existing = self._existing_marker(shard)
        if existing is not None:  # a retried call whose first attempt finished
            return existing
        started = time.perf_counter()
        d_sae = {name: sae.cfg.d_sae for name, sae in self.saes.items()}
        # on a GPU, statistics accumulate there; on a CPU the host's pool does it beside the forward
        builder = ShardBuilder(self.host, d_sae, self.job.value_dtype, self.job.top_k,
                               stats_device=self.device if self.device.type == "cuda" else None)
        # read and tokenize before taking the device, which the other shard in flight keeps busy
        # meanwhile; one shard at a time, as a tokenizer whose saved settings truncate or pad changes
        # its own state on its first call, and two calls then would race (tokenizers' "Already borrowed")
        with self.tokenizer_lock:
            rows = self.dataset[shard.row_start : shard.row_stop][self.job.dataset.column]
            windows = self._windows(rows, shard)
        for encoded in self._encoded_batches(windows):
            builder.add(encoded)
        saes, feature_stats = builder.finish(windows.n_tokens)
        data = ShardData(
            shard_id=shard.shard_id,
            row_start=shard.row_start,
            row_stop=shard.row_stop,
            token_limit=shard.token_limit,
            window_start=shard.window_start,
            n_windows=shard.n_windows,
            token_ids=windows.flat_tokens(),
            rows=windows.rows,
            positions=windows.positions,
            saes=saes,
            stats=feature_stats,
            rows_digest=rows_digest(rows),
        )
        marker = self.writer.write_shard(data, self.job.value_dtype, d_sae, self.job.top_k, pool=self.host)
        log.info("shard %d: %d tokens in %.1fs", shard.shard_id, data.n_tokens, time.perf_counter() - started)
        return marker

    def _encoded_batches(self, windows) -> Iterator[dict[str, SparseBatch]]:
        """Each batch's sparse activations, in order. With one stream, this thread encodes them while it
        holds the device. With several, the shard's batches are queued at once, behind those of the
        shard before it, so the streams go on from one shard to the next without waiting; what they
        hold meanwhile is a shard's sparse activations, which its ShardBuilder keeps anyway."""
        size = self.job.batch_size

        def encode(start: int) -> dict[str, SparseBatch]:
            lengths = windows.lengths[start : start + size]
            tokens = torch.from_numpy(windows.tokens[start : start + size, : int(lengths.max())]).to(self.device)
            return self.encoder(tokens, torch.from_numpy(lengths).to(self.device))

        starts = range(0, len(windows.lengths), size)
        if self.streams is None:
            with self.device_lock:
                yield from map(encode, starts)
            return
        with self.device_lock:
            queued = [self.streams.submit(encode, start) for start in starts]
        try:
            for batch in queued:
                yield batch.result()
        finally:
            for batch in queued:  # after a failure, what has not started yet
                batch.cancel()

    def build_index_part(self, location: str, name: str, part: index_mod.Part, shards: list[dict],
                         token_dtype: str) -> dict:
        """One part of the feature-major index, built in this warm process once the shards are written
        (``store.index.build_part``: safe to call again); a call per core the actor holds runs at once."""
        return index_mod.build_part(location, name, part, shards, token_dtype)

    def windows(self, shard: Shard):
        return self._windows(self.dataset[shard.row_start : shard.row_stop][self.job.dataset.column], shard)

    def _windows(self, rows: list, shard: Shard):
        row_ids = range(shard.row_start, shard.row_stop)
        tokens = tokenize_rows(
            rows, row_ids, self.model.tokenizer, self.job.dataset.tokens_column is not None, self.model.cfg.d_vocab
        )
        windows = make_windows(tokens, row_ids, self.job.context_size, self.bos_id, shard.token_limit,
                               shard.window_start, shard.n_windows)
        planned, found = (shard.n_windows, shard.n_tokens), (len(windows.lengths), windows.n_tokens)
        if shard.n_windows is not None and planned != found:
            raise DataError(
                f"shard {shard.shard_id} (dataset rows {shard.row_start}-{shard.row_stop - 1}): the plan counted "
                f"{planned[0]} windows of {planned[1]} tokens there, this worker's tokenizer makes {found[0]} of "
                f"{found[1]}. The driver and the workers must tokenize alike: give them the same tokenizer "
                "(and the same transformers and tokenizers versions)."
            )
        return windows

    def _existing_marker(self, shard: Shard) -> dict | None:
        marker = self.writer.shard_marker(shard.shard_id)
        return marker if marker is not None and shard.is_written_by(marker) else None
