"""fastlesion: fast, fair training of skin-lesion image classifiers.

The library does the work; the CLI only parses and calls. Heavy optional parts (DALI, Ray, pynvml) are imported
lazily where they are used.
"""

__version__ = "0.1.0"

from fastlesion.config import Config, load_config, replace  # noqa: E402

__all__ = ["Config", "load_config", "replace", "train", "__version__"]


def __getattr__(name: str):
    if name == "train":
        from fastlesion.engine.train import train

        return train
    raise AttributeError(name)
