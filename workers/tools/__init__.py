"""Commands beside the modes, one module each, called by workers/cli.py with the parsed settings: ``produce``
(publish Parquet rows to a topic), ``compile`` (lleaves into the cache), ``profile`` (a drift reference),
``schema`` (the input contract, a producer's schema checked), ``compare`` (model versions' results),
``report`` (an HTML page), ``demo``, ``reference`` (``settings``: the settings table, ``--env`` lines).
``files`` holds what they share.

Each prints its own output; those that can fail a check (``compile``, ``schema``) return the exit code. A
mistake or an outage is raised as ConfigError or ScoringError, which the command line turns into one line.
"""
