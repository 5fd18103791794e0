"""Inside the notebook kernel: start a run, record metrics, show them, compare to the paper.

``start_run`` writes the resolved config and an environment watermark next to the outputs; ``record`` appends a
measured number to ``metrics.json`` and ``results_table`` shows them all as one table; ``compare_to_paper`` builds the
"paper vs reproduced" table from ``params/paper_targets.yaml`` — notebooks never type a paper number.
"""

from .run import Run, compare_to_paper, load_targets, provenance, record, results_table, start_run

__all__ = ["Run", "start_run", "record", "results_table", "compare_to_paper", "load_targets", "provenance"]
