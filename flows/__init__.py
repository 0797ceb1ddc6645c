"""Prefect flows (the DAGs) and the command line."""
