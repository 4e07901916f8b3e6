"""Training data: sources (JSONL, Parquet, TFDS), examples (text, chat, GSM8K), packing, pipeline."""

from nemotron_jax.data.examples import ExampleFormat, make_example, messages_for
from nemotron_jax.data.packing import Example, PackedDataset, PackStats, pack
from nemotron_jax.data.pipeline import DataConfig, DataPipeline
from nemotron_jax.data.sources import DataError, open_source

__all__ = ["DataConfig", "DataError", "DataPipeline", "Example", "ExampleFormat", "PackStats", "PackedDataset",
           "make_example", "messages_for", "open_source", "pack"]
