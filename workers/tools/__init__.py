"""Commands beside the modes: ``produce`` (publish Parquet rows to a topic), ``compare`` (two model versions'
results), ``report`` (an HTML page), ``schema`` (the input contract), ``demo``."""
