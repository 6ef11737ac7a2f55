"""The ``pwf`` command's subcommands, one module each: :mod:`~pwf_flows.commands.run`,
:mod:`~pwf_flows.commands.sweep`, :mod:`~pwf_flows.commands.report`,
:mod:`~pwf_flows.commands.export` (``pwf ui`` is :mod:`pwf_flows.ui`). :mod:`pwf_flows.cli`
parses the arguments, dispatches, and turns every expected failure into one line
(:mod:`~pwf_flows.commands.failures`)."""
