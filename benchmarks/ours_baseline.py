"""Our server as it was before #19's fixes, for a paired before/after in the same run (`run.py --only serve
--serve-baseline`): asyncio's event loop and the h11 parser instead of uvloop and httptools, and no gc.freeze.
Benchmark-only: the product has no switch for this. Usage: the arguments of `scoring-worker serve`."""

import functools
import sys

import uvicorn

import workers.runtime.serve.dataplane as dataplane
from workers.cli import main

uvicorn.Config.__init__ = functools.partialmethod(uvicorn.Config.__init__, loop="asyncio", http="h11")  # type: ignore
dataplane.warm_and_freeze = lambda router: None  # type: ignore[assignment]

if __name__ == "__main__":
    sys.argv = ["scoring-worker", "serve", *sys.argv[1:]]
    main()
