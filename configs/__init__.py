"""The shipped experiment configs: installed as the package data ``pwf_flows.configs`` (see
``pyproject.toml``), so that an installed ``pwf run`` finds its embedded default."""
