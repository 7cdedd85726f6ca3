"""Tables (and later Markdown/HTML reports and plots) of results."""

from tensorpress.report.tables import experts_table, layers_table, packed_table, report_table, tasks_table

__all__ = ["experts_table", "layers_table", "packed_table", "report_table", "tasks_table"]
