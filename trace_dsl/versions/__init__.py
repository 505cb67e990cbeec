"""Policy versions: reading a policy at a git revision, diffing two versions, and plans.

`trace diff` compares two versions statically (rules and predicates by id) and by replay (a flip
matrix of verdicts over a dataset). `trace plan` records a reviewed triage, and `trace apply
--plan` trains exactly what was reviewed.
"""
