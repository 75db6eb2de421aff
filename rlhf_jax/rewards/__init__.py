"""Where a scalar reward comes from: Python reward functions (`functions`), programmatic
verifiers (`verifiers`) and trained reward models loaded from a folder.

`reward.function` and `verifier` in a config name user code (`module:function` or
`path/to/file.py:function`) that is imported and run in this process: only point them at
code you trust.
"""
