"""2DGBNN: stochastic weight sharing for Bayesian networks (Lin et al., AISTATS 2025).

``gaussians`` holds the closed-form 2-D Gaussian algebra and k-means; ``sharing`` the container
of shared Gaussians, ``network`` its installation on a model, ``blending`` and ``merging`` what
changes its members; ``method`` the method's stages and its presentation; ``export`` its file
format (registered with the exporter).
"""

from pwf_core.methods.gbnn2d.config import TwoDGBNNConfig
from pwf_core.methods.gbnn2d.method import TwoDGBNN

__all__ = ["TwoDGBNN", "TwoDGBNNConfig"]
