"""PWFN: probabilistic weight fixing (Subia-Waud & Dasmahapatra, NeurIPS 2023).

``codebook`` builds the power-of-two / additive-power-of-two centres, ``variance`` the sigma
prior, and ``fixing`` the method: sigma-scaled greedy fixing rounds.
"""

from pwf_core.methods.pwfn.fixing import PWFN, PWFNConfig, pwfn_fix_round

__all__ = ["PWFN", "PWFNConfig", "pwfn_fix_round"]
