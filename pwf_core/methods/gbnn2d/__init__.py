"""2DGBNN: stochastic weight sharing for Bayesian networks (Lin et al., AISTATS 2025).

``gaussians`` holds the closed-form 2-D Gaussian algebra and k-means, ``sharing`` the
shared-Gaussian weights of a network, ``method`` the method's stages, ``export`` its file
format.
"""

from pwf_core.methods.gbnn2d.method import TwoDGBNN, TwoDGBNNConfig

__all__ = ["TwoDGBNN", "TwoDGBNNConfig"]
