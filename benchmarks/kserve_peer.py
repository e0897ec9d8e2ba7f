"""The KServe peer: KServe's Python model server (``kserve`` 0.21) with a model doing what its ``lgbserver`` does
(``lgbserver`` is not on PyPI): read the request with kserve's ``get_predict_input``, ``Booster.predict`` with one
thread (lgbserver's default ``nthread``), answer with ``get_predict_response``. Runs in .bench/kserve-venv.
Usage: python kserve_peer.py MODEL_FILE HTTP_PORT GRPC_PORT (the model is served as "m")."""

import sys

import kserve
import lightgbm as lgb
from kserve.utils.utils import get_predict_input, get_predict_response


class LightGBMModel(kserve.Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self._booster = lgb.Booster(model_file=self.path)
        self.ready = True
        return self.ready

    def predict(self, payload, headers=None):
        instances = get_predict_input(payload, columns=self._booster.feature_name())
        result = self._booster.predict(instances, num_threads=1)
        return get_predict_response(payload, result, self.name)


if __name__ == "__main__":
    path, http_port, grpc_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sys.argv = sys.argv[:1]  # kserve parses the command line itself
    kserve.ModelServer(http_port=http_port, grpc_port=grpc_port).start([LightGBMModel("m", path)])
