"""Configuration: the TOML reader (:mod:`.toml`), the rule language of routes (:mod:`.rules`),
the typed, frozen configuration (:mod:`.schema`) and what a reload may change (:mod:`.reload`).

The lowest part of the node after :mod:`node.errors`: it imports nothing else of the node.
"""
