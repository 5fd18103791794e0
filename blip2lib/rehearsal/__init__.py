"""The dress rehearsal of the paper path (``python -m blip2lib.workbook rehearse``).

Tiny models in the released files' formats (``weights.py``), datasets in the official layouts (``data.py``), and
every ``paper_*`` params file run through the normal runner against them (``run.py``).
"""
