"""wbctl's commands that use both planes: ``simulate`` builds a set as the controller does and
has the proxy's engine pick from it; ``spread`` compares the proxies' counters with the shares.

They live outside :mod:`weighbridge` because the shared wire contract imports neither plane,
and the planes never import each other (import-linter's contracts in pyproject.toml); a tool
on top may use both, and nothing imports it. ``wbctl`` starts here (:mod:`wbtools.cli`) and
hands every other command to :mod:`weighbridge.wbctl`.
"""
