"""The orchestration layer: the `imat` command line and its commands, `imat pipeline`, the results
table, the HTML report and the choice of the model to submit.

It is the only part of the ``imat`` package that knows the stages (``teachers``, ``distill``,
``submit``): the core below it imports none of them (import-linter contracts in pyproject.toml).
"""
