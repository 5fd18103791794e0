"""Inside the notebook kernel: start a run, record metrics, compare to the paper.

``start_run`` writes the resolved config and an environment watermark next to the outputs; ``record`` appends a
measured number to ``metrics.json``; ``compare_to_paper`` builds the "paper vs reproduced" table from
``params/paper_targets.yaml`` — notebooks never type a paper number.
"""

from .run import Run, compare_to_paper, load_targets, provenance, record, start_run

__all__ = ["Run", "start_run", "record", "compare_to_paper", "load_targets", "provenance"]
