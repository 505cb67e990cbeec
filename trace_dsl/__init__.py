"""trace-dsl: policy-as-code for re-aligning language models when their policy changes.

The package implements TRACE (Triage and Re-align by Alignment Conflict Evaluation) from
"The Realignment Problem: When Right becomes Wrong in LLMs" (arXiv 2511.02623): a new policy
written as a `.tp` file compiles into a triage classifier that sorts old preference pairs into
invert, suppress and retain, and a runtime re-aligns a model on them with LoRA.
"""

__version__ = "0.1.0"
