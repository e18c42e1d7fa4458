"""Maintenance scripts run with ``python -m lit_ptq.tools.<name>``; nothing here is imported by the package."""
