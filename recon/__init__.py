"""Reconciliation: external statements (parsed in `recon.formats`), matched against the
ledger's settlements in set-based SQL, with every difference classified and recorded."""
