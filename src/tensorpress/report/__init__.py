"""Tables, and the HTML/Markdown report (collect.py reads runs, page.py writes the page)."""

from tensorpress.report.tables import experts_table, layers_table, packed_table, report_table, tasks_table

__all__ = ["experts_table", "layers_table", "packed_table", "report_table", "tasks_table"]
