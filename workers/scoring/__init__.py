"""Records to results: the model, its features and scorer, and the router every mode scores through.

``model`` loads and verifies a LightGBM text model; ``scorer`` turns an Arrow batch into results and error
rows; ``router`` is the entry point of every mode (a single ``--model`` is a router of one version; a routing
file adds sticky A/B splits (``sticky``), shadows and guardrails (``guard``)); ``build`` makes the router for
each command; ``drift`` and ``explain`` hang off the scoring path.
"""
