"""Wire formats to Arrow: JSON records (``records``), Open Inference Protocol tensors (``oip``), CloudEvents
(``cloudevents``). Pure functions, no I/O."""
