"""Methods, one module (or package) each, registered by their config class.

Adding a method: write ``methods/<name>.py`` (or a package) with a config (a
:class:`~pwf_core.registry.MethodConfig` subclass with ``method: Literal["<name>"]``) and a
:class:`~pwf_core.methods.base.Method` subclass decorated with
:func:`~pwf_core.registry.register_method`, then import it below. Nothing outside its package
names it: the flows, the reports and the exports ask the method.
"""

from pwf_core.methods.base import Column, Figure, Method, Step, StepContext, StepRecord
from pwf_core.methods.gbnn2d import TwoDGBNN, TwoDGBNNConfig
from pwf_core.methods.kmeans import KMeans, KMeansConfig
from pwf_core.methods.pwfn import PWFN, PWFNConfig
from pwf_core.methods.rounds import FixingConfig, FixingMethod, FlatWeights, fixed_target
from pwf_core.methods.uniform import Uniform, UniformConfig
from pwf_core.methods.wfn import WFN, WFNConfig

__all__ = [
    "PWFN",
    "WFN",
    "Column",
    "Figure",
    "FixingConfig",
    "FixingMethod",
    "FlatWeights",
    "KMeans",
    "KMeansConfig",
    "Method",
    "PWFNConfig",
    "Step",
    "StepContext",
    "StepRecord",
    "TwoDGBNN",
    "TwoDGBNNConfig",
    "Uniform",
    "UniformConfig",
    "WFNConfig",
    "fixed_target",
]
