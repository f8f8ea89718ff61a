"""Dataset loading: cards (datasets/*.yaml) + loader kinds -> in-memory uint8 image tensors.

See bench/data/base.py for the contracts (Split, DataBundle, the loader-kind interface).
"""

from bench.data.base import LOADERS, DataBundle, Split, build_bundle, data_root, describe

__all__ = ["LOADERS", "DataBundle", "Split", "build_bundle", "data_root", "describe"]
