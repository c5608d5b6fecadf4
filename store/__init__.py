"""The latentstore zarr format: writing shards, reading them back, queries.

Needs numpy, zarr and numcodecs only: no torch, no Ray.
"""

import warnings

# Our delta filter is a numcodecs codec; zarr warns about that on every array it opens.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

from store.errors import LatentStoreError  # noqa: E402
from store.format import FORMAT_VERSION  # noqa: E402
from store.reader import FeatureStore  # noqa: E402

__all__ = ["FORMAT_VERSION", "FeatureStore", "LatentStoreError"]
