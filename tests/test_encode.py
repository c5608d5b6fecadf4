"""The device-side conversions of the sparse encoder: feature ids to the store's index dtype by
casts every device implements, and values rounded to the storage form of their dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.encode import nonzeros, to_index, to_storage


def test_feature_ids_convert_exactly_to_both_index_dtypes():
    ids = torch.arange(0, 1 << 16)
    np.testing.assert_array_equal(to_index(ids, np.dtype("<u2")).numpy(), np.arange(1 << 16, dtype=np.uint16))
    wide = torch.tensor([0, 65_535, 65_536, 1_000_000, 2**31 - 1])
    np.testing.assert_array_equal(to_index(wide, np.dtype("<u4")).numpy(), wide.numpy().astype(np.uint32))


def test_bfloat16_values_travel_as_their_bits():
    values = torch.tensor([1.617, -0.003, 3.0e4, 1e-8])
    bits = to_storage(values, "bfloat16").numpy()
    assert bits.dtype == np.uint16
    decoded = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(decoded, values.to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_nonzeros_are_every_nonzero_latent_row_major(dtype):
    """Negative values kept, empty rows and a strided view included: the same entries, in the same
    order, as a scan of the dense latents (numpy's on a CPU, torch's for bfloat16)."""
    gen = torch.Generator().manual_seed(3)
    latents = (torch.randn(40, 24, generator=gen) * (torch.rand(40, 24, generator=gen) < 0.2)).to(dtype)
    latents[5] = 0
    latents[-1] = 0
    for dense in (latents, latents.T):
        token, feature, values = nonzeros(dense)
        expected = [(t, f, dense[t, f].item()) for t in range(dense.shape[0]) for f in range(dense.shape[1])
                    if dense[t, f] != 0]
        assert list(zip(token.tolist(), feature.tolist(), values.tolist())) == expected
        assert values.dtype == dtype and len(expected) > 0 and (values < 0).any()


def test_latents_encoded_in_blocks_equal_run_with_cache_with_saes(assets, monkeypatch):
    """On a CPU the encoder reads each SAE's latents a block of tokens at a time (``CPU_BLOCK_BYTES``);
    here blocks of 7 tokens, the last one shorter, over right-padded windows of several lengths."""
    from pipeline import encode
    from pipeline.models import load_model
    from pipeline.saes import SAESource, load_sae

    monkeypatch.setattr(encode, "CPU_BLOCK_BYTES", 1)
    monkeypatch.setattr(encode, "CPU_BLOCK_MIN_ROWS", 7)
    model = load_model(str(assets["model_dir"]))
    saes = {hook: load_sae(SAESource.parse(str(d))) for hook, d in assets["sae_dirs"].items()}
    lengths = torch.tensor([16, 5, 11, 1])  # 33 real tokens: blocks of 7, 7, 7, 7 and 5
    tokens = torch.randint(1, model.cfg.d_vocab, (len(lengths), 16), generator=torch.Generator().manual_seed(0))
    tokens[torch.arange(16)[None, :] >= lengths[:, None]] = 0
    found = encode.SparseEncoder(model, saes, "float32")(tokens, lengths)

    expected = {hook: [] for hook in saes}
    for window, n in zip(tokens, lengths):
        _, cache = model.run_with_cache_with_saes(window[:n][None], saes=list(saes.values()), use_error_term=True)
        for hook in saes:
            expected[hook].append(cache[f"{hook}.hook_sae_acts_post"][0])
    for hook, sae in saes.items():
        dense = torch.cat(expected[hook]).numpy()
        ours = np.zeros_like(dense)
        batch = found[hook]
        ours[np.repeat(np.arange(len(batch.counts)), batch.counts), batch.indices.astype(np.int64)] = batch.values
        assert batch.counts.sum() > 0
        np.testing.assert_array_equal(ours != 0, dense != 0, err_msg=f"active features differ at {hook}")
        np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=5e-6, err_msg=hook)


def _loaded(assets):
    from pipeline.models import load_model
    from pipeline.saes import SAESource, load_sae

    return (load_model(str(assets["model_dir"])),
            {hook: load_sae(SAESource.parse(str(d))) for hook, d in assets["sae_dirs"].items()})


def test_calls_from_several_threads_at_once_each_encode_their_own_batch(assets, one_torch_thread):
    """A CPU worker encodes one batch per core at once through one model (``encode_streams``): each
    call's activations are those of its own batch, exactly as one call at a time gives them."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.encode import SparseEncoder

    model, saes = _loaded(assets)
    encoder = SparseEncoder(model, saes, "float32")
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        lengths = torch.randint(1, 33, (6,), generator=generator)
        batches.append((torch.randint(1, model.cfg.d_vocab, (6, 32), generator=generator), lengths))
    alone = [encoder(tokens, lengths) for tokens, lengths in batches]
    with ThreadPoolExecutor(4) as streams:
        for _ in range(3):
            together = list(streams.map(lambda batch: encoder(*batch), batches))
            for one, other in zip(alone, together):
                for hook in saes:
                    assert one[hook].counts.sum() > 0
                    for field in ("counts", "indices", "values"):
                        np.testing.assert_array_equal(getattr(one[hook], field), getattr(other[hook], field))


def test_an_encoder_whose_hooks_were_removed_says_so(assets):
    from pipeline.encode import SparseEncoder

    model, saes = _loaded(assets)
    encoder = SparseEncoder(model, saes, "float32")
    model.run_with_hooks(torch.ones((1, 4), dtype=torch.long), fwd_hooks=[])  # resets its own hooks only
    assert encoder(torch.ones((1, 4), dtype=torch.long), torch.tensor([4]))
    model.reset_hooks(including_permanent=True)
    with pytest.raises(RuntimeError, match=r"reset_hooks\(including_permanent=True\).*new SparseEncoder"):
        encoder(torch.ones((1, 4), dtype=torch.long), torch.tensor([4]))



@pytest.mark.parametrize("normalization", ["constant_norm_rescale", "layer_norm"])
def test_saes_that_keep_state_while_encoding_encode_one_call_at_a_time(assets, one_torch_thread, normalization):
    """sae_lens's run-time activation normalizations keep each call's scale on the SAE (x_norm_coeff; ln_mu
    and ln_std) between setting and using it, so streams encoding at once would mix them (seen as a
    shape mismatch in CI, a wrong scale where shapes agree): such an SAE encodes one call at a time, and
    every call's activations are those of its own batch."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.encode import SparseEncoder
    from pipeline.models import load_model
    from tests.conftest import make_sae

    model = load_model(str(assets["model_dir"]))
    hook = "blocks.1.hook_resid_mid"
    sae = make_sae("jumprelu", hook, seed=7, normalize_activations=normalization)
    encoder = SparseEncoder(model, {hook: sae}, "float32")
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randint(1, model.cfg.d_vocab, (4, 24), generator=generator),
                torch.randint(1, 25, (4,), generator=generator)) for _ in range(12)]
    alone = [encoder(tokens, lengths)[hook] for tokens, lengths in batches]
    inside, most, encode = [0], [0], sae.encode

    def watched(x):  # counts the calls under way, and lingers so that overlapping ones would show
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.002)
            return encode(x)
        finally:
            inside[0] -= 1

    sae.encode = watched
    with ThreadPoolExecutor(4) as streams:
        together = [found[hook] for found in streams.map(lambda batch: encoder(*batch), batches)]
    assert most[0] == 1
    for one, other in zip(alone, together):
        assert one.counts.sum() > 0
        for field in ("counts", "indices", "values"):
            np.testing.assert_array_equal(getattr(one, field), getattr(other, field))
