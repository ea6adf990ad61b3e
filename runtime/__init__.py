"""Running compiled graphs: text models, generation with a KV cache, benchmarks, CKKS."""

from txcompile.runtime.generate import Generated, Generator, Sampling

__all__ = ["Generated", "Generator", "Sampling"]
