"""pwf_core: probabilistic weight fixing (PWFN) and stochastic weight sharing (2DGBNN) in plain
torch.

The public API::

    import pwf_core

    history = pwf_core.compress(model, train_loader, {"method": "pwfn", "b": 4},
                                eval_loader=test_loader)
    pwf_core.save_compressed(model, "model.safetensors")
    plain = pwf_core.load_compressed("model.safetensors", model=MyNet())
    pwf_core.export_onnx(plain, "model.onnx", example_input)  # codebook + indices in ONNX
    pwf_core.strip(model)   # back to the original classes and state_dict keys

Nothing here imports Prefect, MLflow or Optuna.
"""

from pwf_core.api import Compression, compress
from pwf_core.bayes import sampling, strip
from pwf_core.config import ExperimentConfig, TrainConfig, load_config
from pwf_core.export import load_compressed, save_compressed
from pwf_core.methods import (
    KMeansConfig,
    Method,
    PWFNConfig,
    TwoDGBNNConfig,
    UniformConfig,
    WFNConfig,
)
from pwf_core.onnx_export import export_onnx
from pwf_core.registry import MethodConfig, method_names, register_method

__version__ = "0.3.0"

__all__ = [
    "Compression",
    "ExperimentConfig",
    "KMeansConfig",
    "Method",
    "MethodConfig",
    "PWFNConfig",
    "TrainConfig",
    "TwoDGBNNConfig",
    "UniformConfig",
    "WFNConfig",
    "__version__",
    "compress",
    "export_onnx",
    "load_compressed",
    "load_config",
    "method_names",
    "register_method",
    "sampling",
    "save_compressed",
    "strip",
]
