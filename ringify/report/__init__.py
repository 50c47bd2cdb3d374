"""What ringify found, rewrote and refused, and what the ring costs: the report and its pages.

:class:`Report` is the record (``rm.report()``; ``.to_markdown()``, ``.to_json()``, ``.to_html(path)``).
The parts: ``summary`` condenses the rewritten graph for the picture, ``layout`` places it, ``plots`` draws
it and the cost curves, ``markdown`` and ``html`` (``templates/``) write the pages, ``units`` and ``words``
say numbers and masks the same way on both.
"""

from .record import Report, add_mask_structures, build_report
from .summary import graph_summary
from .words import mask_text

__all__ = ["Report", "add_mask_structures", "build_report", "graph_summary", "mask_text"]
