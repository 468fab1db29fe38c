"""switchyard-worker: serve one Python function as a switchyard model worker.

    from switchyard_worker import serve

    def predict(request):                 # a dict with the ModelRequest fields; request["payload"] is bytes
        return "0.73"                     # str, bytes, a number, or a dict/list (JSON); raise to answer an error

    serve("churn-v2", predict)            # reads model.churn-v2.requests, answers on model.churn-v2.predictions
"""

from .codec import Codec, DecodeError
from .config import WorkerConfig, load_config
from .partition import kafka_partition, murmur2
from .registry import IncompatibleSchema, RegistryError, RegistryUnreachable, SchemaRegistry
from .worker import Metrics, Worker, output_bytes, serve

__all__ = ["Codec", "DecodeError", "IncompatibleSchema", "Metrics", "RegistryError", "RegistryUnreachable",
           "SchemaRegistry", "Worker", "WorkerConfig", "kafka_partition", "load_config", "murmur2", "output_bytes",
           "serve"]
__version__ = "0.1.0"
