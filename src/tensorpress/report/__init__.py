"""Tables (and later Markdown/HTML reports and plots) of results."""

from tensorpress.report.tables import layers_table, packed_table, report_table

__all__ = ["layers_table", "packed_table", "report_table"]
