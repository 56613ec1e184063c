"""Reconciliation: the shop's ledger against the mirror of venue orders, and its reports."""
